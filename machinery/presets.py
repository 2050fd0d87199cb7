"""
train.py's settings per data set, as plain data: the paper's (official args/*.yaml), the superposition
paper's for prosqa_graph, the CPU demo's for reach (the first demo's for tiny). options.check_args fills every flag left unset from
them: first GENERAL_DEFAULTS, then the data set's row (USER for a folder of the user's, and SCRATCH on top
when it trains from scratch). None: settled from the data when the run has loaded it (train.settle_from_data).
"""

GENERIC = dict(c_thought=1, max_latent_stage=6, stage_epochs=5, epochs=50, max_new_tokens=128)
# A user's data set: the generic curriculum; validation writes at most what its longest target needs
# (None), not 128 tokens per question from an untrained model.
USER = dict(GENERIC, max_new_tokens=None)
DATASET_DEFAULTS = {
    "prosqa": GENERIC,
    "prontoqa": GENERIC,
    "gsm8k": dict(c_thought=2, max_latent_stage=3, stage_epochs=3, epochs=25, max_new_tokens=64),
    # "Reasoning by Superposition": a 2-layer, 8-head, 768-wide GPT-2 from scratch, one token per node,
    # 4 stages of 25 epochs, 300 epochs, uniform_prob 0.1, batch 256, edges reshuffled every epoch
    "prosqa_graph": dict(c_thought=1, max_latent_stage=4, stage_epochs=25, epochs=300, max_new_tokens=16,
                         uniform_prob=0.1, init_from="scratch", n_layer=2, n_head=8, n_embd=768, block_size=512,
                         dropout=0.1, batch_size=256, grad_accum=1, tokenizer="symbols", shuffle_graph=1,
                         eval_batch_size=256),
    # reach: the CPU demo's graph search (data/reach/prepare.py; docs/search.md tells how it was found): a
    # 2-layer, 4-head, 128-wide GPT from scratch, bare thoughts, each labelled with the search's frontier (the
    # nodes k roads from the start, an even spread over them: no label names the path; --thought_labels 1 gives
    # the gold step's, as CoT's), one epoch a stage, three at the last one, one AdamW throughout (from scratch
    # a fresh one every epoch only slows every method down)
    "reach": dict(c_thought=1, max_latent_stage=4, stage_epochs=1, epochs=7, max_new_tokens=10, init_from="scratch",
                  n_layer=2, n_head=4, n_embd=128, block_size=128, tokenizer="symbols", markers=0,
                  thought_labels="frontier", set_loss="spread", batch_size=64, grad_accum=1, lr=1e-3, eval_batch_size=250, reset_optimizer="never"),
    # tiny: the first CPU demo's small world (data/tiny/prepare.py); a 2-layer model from scratch, a larger lr
    "tiny": dict(c_thought=1, max_latent_stage=4, stage_epochs=1, epochs=8, max_new_tokens=48,
                 batch_size=64, grad_accum=1, lr=1e-3),
}
# Elsewhere the paper's: AdamW lr 1e-4, 32 sequences x 4 GPUs = 128 per optimizer step, GPT-2 124M.
GENERAL_DEFAULTS = dict(batch_size=32, grad_accum=4, lr=1e-4, init_from="gpt2", uniform_prob=0.0, n_layer=2,
                        n_head=4, n_embd=128, block_size=256, tokenizer="auto", shuffle_graph=0, eval_batch_size=64,
                        markers=1, thought_labels=0, set_loss="mass", decay_lr=0)
DEMO = dict(dataset="reach", init_from="scratch", out_dir="out-demo")
DEMO_METHODS = ("coconut", "cot", "nocot")  # trained in turn, the same model for the same optimizer steps
# A user's data set from scratch learns like the demo (lr 1e-3, no accumulation), in a batch that gives
# every epoch at least MIN_STEPS_PER_EPOCH optimizer steps (None): the paper's 32 x 4 with lr 1e-4 gave
# 50 records one step per epoch, and the model learnt nothing.
SCRATCH = dict(batch_size=None, grad_accum=1, lr=1e-3)
MIN_STEPS_PER_EPOCH, MAX_SCRATCH_BATCH = 16, 64
# From a Llama (--init_from meta-llama/Llama-3.2-1B, a Llama folder, or a .pt of a Llama run): the recipe that
# CODI (Shen et al. 2025, arXiv 2502.21074, appendix) reports for its Coconut baseline on LLaMA-3.2-1B and
# GSM8k: lr 1e-5, 5 epochs of CoT, then 5 of Coconut (here: from the CoT checkpoint with --start_epoch 1,
# one epoch per stage: stages 1, 2, 3, then two epochs at the all-latent stage). Under the data set's row;
# options.check_args adds bfloat16 autocast on a GPU.
LLAMA_DEFAULTS = dict(lr=1e-5)
LLAMA_GSM8K = dict(cot=dict(epochs=5), coconut=dict(stage_epochs=1, epochs=6))
