"""
Side-by-side timings, as ratios measured in one run (absolute times on a shared machine are noise).

(a) training step: Coconut forward+backward with n thoughts / a plain forward+backward over the same
    padded batch (the latents read as ordinary tokens); with --official, the authors' Coconut
    (Hugging Face GPT-2 with the same weights) on the same batch.
(b) evaluation: questions per second of our batched, KV-cached generate vs one question at a time
    re-running the whole sequence for every new token (the official generate's algorithm, here on our
    GPT), and vs one at a time with the cache.

    python bench.py                                 # GPT-2 124M shape and a small model, CPU, fp32
    python bench.py --device cuda --dtype bfloat16  # the same on a GPU, bf16 autocast
    python bench.py --official /path/to/facebookresearch/coconut   # adds the official code (needs transformers)

Weights are random (the timings do not depend on them); batches are real ProsQA validation records.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from coconut import Coconut
from curriculum import collate, gpt2_tokenizer, load_records, make_example, make_question, tokenize
from gpt import GPT, GPTConfig

SIZES = {"gpt2": dict(n_layer=12, n_head=12, n_embd=768), "small": dict(n_layer=4, n_head=4, n_embd=256)}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def bench_train(model, batch, args, official=None):
    """Median seconds of one forward+backward: plain, Coconut, and optionally the official Coconut."""
    ids, mask, labels, pos = (batch[k] for k in ("input_ids", "attention_mask", "labels", "position_ids"))
    autocast = torch.autocast(args.device.split(":")[0], dtype=getattr(torch, args.dtype), enabled=args.dtype != "float32")

    def plain():
        with autocast:
            logits = model.gpt(ids, attention_mask=mask, position_ids=pos)[0]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()

    def coconut():
        with autocast:
            loss, _ = model(ids, mask, labels, pos)
        loss.backward()

    def theirs():
        with autocast:
            loss = official(ids, mask, labels, pos).loss
        loss.backward()

    def hf_plain():  # Hugging Face's GPT-2 (inside the official Coconut), the same plain step
        with autocast:
            logits = official.base_causallm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()

    runs = {"plain": plain, "coconut": coconut}
    if official is not None:
        runs.update(official=theirs, hf_plain=hf_plain)
    times = {k: [] for k in runs}
    for r in range(args.warmup + args.repeats):
        for name, fn in runs.items():  # interleaved, so a noisy neighbour hits every variant alike
            t, _ = timed(fn, args.device)
            model.zero_grad(set_to_none=True)
            if official is not None:
                official.zero_grad(set_to_none=True)
            if r >= args.warmup:
                times[name].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def uncached_generate(model, question, max_new_tokens):
    """The official generate's algorithm on our GPT: batch 1, the whole sequence re-run per new token."""
    ids = torch.tensor([question], device=model.gpt.lm_head.weight.device)
    ones = torch.ones_like(ids)
    hidden, state = model.think(ids, ones, torch.arange(ids.size(1), device=ids.device)[None])
    logits = model.gpt.lm_head(hidden[:, -1:])
    embeds = model.gpt.transformer.wte(ids)
    latent_cols = (ids[0] == model.latent_id).nonzero().flatten()
    embeds[0, latent_cols] = state["thoughts"][0, :len(latent_cols)]  # the filled sequence
    out = []
    for step in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        if step > 0 and token == model.eos_id:
            break
        out.append(token)
        embeds = torch.cat([embeds, model.gpt.transformer.wte(torch.tensor([[token]], device=ids.device))], 1)
        logits = model.gpt(inputs_embeds=embeds)[0]
    return out


def bench_generate(model, questions, args):
    """Questions per second: batched+cached, one at a time cached, one at a time uncached."""
    dev = args.device
    autocast = torch.autocast(dev.split(":")[0], dtype=getattr(torch, args.dtype), enabled=args.dtype != "float32")

    def batched():
        out = []
        for i in range(0, len(questions), args.gen_batch):
            b = collate(questions[i:i + args.gen_batch])
            out += model.generate(b["input_ids"].to(dev), b["attention_mask"].to(dev), args.max_new_tokens)
        return out

    def one_cached():
        return [model.generate(torch.tensor([q], device=dev), torch.ones(1, len(q), device=dev), args.max_new_tokens)[0]
                for q in questions]

    def one_uncached():
        return [uncached_generate(model, q, args.max_new_tokens) for q in questions]

    qps, outs = {}, {}
    with autocast:
        model.generate(torch.tensor([questions[0]], device=dev), torch.ones(1, len(questions[0]), device=dev), 2)  # warm-up
        for name, fn in [("batched, cached", batched), ("one at a time, cached", one_cached),
                         ("one at a time, uncached (official way)", one_uncached)]:
            t, outs[name] = timed(fn, dev)
            qps[name] = len(questions) / t
    same = len({json.dumps(o) for o in outs.values()}) == 1
    return qps, same


def memory_child(args):
    """
    One training step (forward + backward) of the GPT-2 124M shape, fp32, on --memory_batch real ProsQA
    records at stage 6, in a fresh process: prints {"variant", "loss", "peak_gb"} as JSON. "before" is the
    forward this project had first: logits at every position and a cache copied at every thought;
    "after" is today's (logits only where a label is, and a chunked cache). The peak is what the step
    adds to the process: on CUDA max_memory_allocated, on a CPU the peak resident set size.
    """
    tok = gpt2_tokenizer()
    records = [tokenize(r, tok) for r in load_records(args.data_path)][:args.memory_batch]
    b = {k: v.to(args.device) for k, v in collate([make_example(t, 6) for t in records]).items()}
    torch.manual_seed(0)
    model = Coconut(GPT(GPTConfig(**SIZES["gpt2"], vocab_size=50260)), tok.latent_id, tok.start_id, tok.end_id,
                    tok.eos_id).to(args.device)
    model.chunked_cache = args.memory_child == "after"
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    ids, mask, labels, pos = (b[k] for k in ("input_ids", "attention_mask", "labels", "position_ids"))
    if args.memory_child == "before":
        hidden, _ = model.think(ids, mask, pos)
        logits = model.gpt.lm_head(hidden)  # (B, L, V): every position
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
    else:
        loss, _ = model(ids, mask, labels, pos)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps(dict(variant=args.memory_child, shape=list(ids.shape), loss=loss.item(), peak_gb=peak / 2**30)))


def bench_memory(args):
    """The peak memory of a paper-default training step, before and after, each in a process of its own."""
    rows = {}
    for variant in ("before", "after"):
        cmd = [sys.executable, os.path.abspath(__file__), "--memory_child", variant, "--device", args.device,
               "--data", args.data_path, "--memory_batch", str(args.memory_batch), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows[variant] = json.loads(out.strip().splitlines()[-1])
    b, a = rows["before"], rows["after"]
    print(f"[gpt2] peak memory of one training step, {args.memory_batch} x {a['shape'][1]} columns, 6 thoughts, fp32: "
          f"before {b['peak_gb']:.2f} GB, after {a['peak_gb']:.2f} GB -> {100 * (1 - a['peak_gb'] / b['peak_gb']):.0f}% "
          f"less; loss {b['loss']:.6f} / {a['loss']:.6f}", flush=True)


def load_official(path, model):
    """The authors' Coconut around a Hugging Face GPT2LMHeadModel holding our model's weights."""
    from transformers import GPT2Config, GPT2LMHeadModel  # only for this comparison; not a dependency
    sys.path.insert(0, path)
    import importlib.util
    spec = importlib.util.spec_from_file_location("official_coconut", os.path.join(path, "coconut.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = model.gpt.config
    hf = GPT2LMHeadModel(GPT2Config(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_positions=c.block_size,
                                    vocab_size=c.vocab_size, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    sd = {k: v for k, v in model.gpt.state_dict().items()}
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    hf.load_state_dict({k: (v.t() if k.endswith(conv1d) else v) for k, v in sd.items()}, strict=False)
    hf.to(model.gpt.lm_head.weight.device).eval()
    return mod.Coconut(hf, model.latent_id, model.start_id, model.end_id, model.eos_id)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="*", default=["gpt2", "small"], choices=list(SIZES),
                   help="model shapes for the speed ratios (none: skip them)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--data", default=None, help="ProsQA-format JSON (default: data/prosqa/valid.json or ../shared/data)")
    p.add_argument("--batch_size", type=int, default=8, help="training batch (records)")
    p.add_argument("--thoughts", type=int, default=6, help="stage of the training batch (c=1: its thoughts)")
    p.add_argument("--questions", type=int, default=16, help="questions to generate for")
    p.add_argument("--gen_batch", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--official", default=None, help="a checkout of facebookresearch/coconut to compare with")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--memory", action="store_true", help="also the peak memory of a training step, before/after")
    p.add_argument("--memory_batch", type=int, default=8, help="records in that step (the paper's micro-batch: 32)")
    p.add_argument("--memory_child", default=None, choices=("before", "after"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [args.data, os.path.join(here, "data", "prosqa", "valid.json"),
                  os.path.join(here, "..", "shared", "data", "prosqa_valid.json")]
    args.data_path = path = next((c for c in candidates if c and os.path.exists(c)), None)
    if path is None:
        sys.exit("bench.py: no ProsQA data: run `python data/prosqa/prepare.py` (or --generate) or pass --data")
    if args.memory_child:
        return memory_child(args)
    tok = gpt2_tokenizer()
    records = [tokenize(r, tok) for r in load_records(path)]
    batch = collate([make_example(t, args.thoughts) for t in records[:args.batch_size]])
    batch = {k: v.to(args.device) for k, v in batch.items()}
    questions = [make_question(t, args.thoughts) for t in records[:args.questions]]
    print(f"device {args.device}, {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"training batch {tuple(batch['input_ids'].shape)} with {args.thoughts} thoughts, "
          f"{len(questions)} questions x {args.max_new_tokens} new tokens")
    if args.memory:
        bench_memory(args)
    for size in args.sizes:
        torch.manual_seed(0)
        gpt = GPT(GPTConfig(**SIZES[size], vocab_size=50260)).to(args.device)
        model = Coconut(gpt, tok.latent_id, tok.start_id, tok.end_id, tok.eos_id)
        official = load_official(args.official, model) if args.official else None
        if official is not None:  # first, the same numbers: loss and logits at every real token
            ids, mask, labels, pos = (batch[k] for k in ("input_ids", "attention_mask", "labels", "position_ids"))
            with torch.no_grad():
                theirs, (loss, logits) = official(ids, mask, labels, pos), model(ids, mask, labels, pos, with_logits=True)
            d = ((theirs.logits - logits).abs() * mask[..., None]).max().item()
            print(f"[{size}] vs official: loss {loss.item():.6f} / {theirs.loss.item():.6f}, max |logit diff| {d:.1e}")
        t = bench_train(model, batch, args, official)
        line = (f"[{size}] train step: plain {t['plain']:.3f}s, coconut {t['coconut']:.3f}s -> "
                f"(a) coconut/plain = {t['coconut'] / t['plain']:.2f}")
        if official is not None:
            line += (f"; official {t['official']:.3f}s -> official/ours = {t['official'] / t['coconut']:.2f}x; "
                     f"plain step in HF's GPT-2 {t['hf_plain']:.3f}s -> HF/ours = {t['hf_plain'] / t['plain']:.2f}x")
        print(line, flush=True)
        model.eval()
        qps, same = bench_generate(model, questions, args)
        base = qps["one at a time, uncached (official way)"]
        print(f"[{size}] generation, questions/s: " + ", ".join(f"{k} {v:.2f}" for k, v in qps.items()) +
              f" -> (b) batched cached / official way = {qps['batched, cached'] / base:.1f}x; "
              f"same tokens in all three: {same}", flush=True)


if __name__ == "__main__":
    main()
