"""
The prepared GPU check: one script that one GPU runs in under 10 minutes; its lines paste into the README.

    python machinery/gpu_check.py                     # 1. environment, 2. numerics, 3. timing, 4. fsdp, 5. run,
                                                      # within --budget_s
    python machinery/gpu_check.py --smoke             # a tiny version of each, seconds on a CPU (tests/test_gpu_check.py)
    python machinery/gpu_check.py --skip timing,run   # the environment and the numerics only

Nothing is downloaded: the data are generated. GPT-2's tokenizer needs tiktoken's files (TIKTOKEN_CACHE_DIR or a
folder ./tiktoken-cache), else sections 2-3 use the symbolic prosqa_graph records and say so. A failing section
prints one `FAILED: ...` line and the next one runs. With $OUT set, the lines also go to $OUT/gpu_check.log,
beside results.json, metrics.jsonl and train.log.
"""
import contextlib, copy, json, os, shutil, statistics, subprocess, sys, tempfile, threading, time  # noqa: E401
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project's root
sys.path.insert(0, ROOT)  # run as a file (python machinery/gpu_check.py), the package and the scripts' modules import

from coconut import Coconut
from curriculum import collate, make_example, make_question
from machinery.argparser import Parser
from machinery.evaluate import generate_batched
from gpt import GPT, GPTConfig
from machinery.records import load_records, tokenize
from machinery.tokenizer import gpt2_tokenizer, symbol_tokenizer

T0 = time.time()
OUT = os.environ.get("OUT")
RESULTS = {}                # every number, also written to $OUT/results.json
STAGE, NEW_TOKENS = 6, 16   # sections 2-3: ProsQA's last stage (6 thoughts), 16 answer tokens
EPOCH_GUESS_S = 8           # a generous guess of one prosqa_graph epoch on an H200 in bf16 (train, validate, save)
COMPILE_RESERVE_S = 300     # compiling can take minutes: only when this much of the budget is left (for the run)


def say(line=""):
    print(line, flush=True)
    if OUT:  # appended line by line: a run killed at the tool's limit still leaves what it printed
        with open(os.path.join(OUT, "gpu_check.log"), "a") as f:
            f.write(line + "\n")


def left(args):
    return args.budget_s - (time.time() - T0)


def autocast(args, bf16):
    return torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def no_compile(args):
    """Why a compiled variant is skipped (torch.compile is checked on CUDA only: on a CPU it takes minutes), or ''."""
    if not args.cuda:
        return "skipped (no CUDA)"
    return f"skipped ({left(args):.0f} s left of the budget, kept for the run)" if left(args) < COMPILE_RESERVE_S else ""


# -----------------------------------------------------------------------------
# Data and models

def prepare(name, out_dir, *flags):
    """data/<name>/prepare.py --generate into out_dir (no network)."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data", name, "prepare.py"), "--generate", "--out_dir",
                        out_dir, *flags], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"data/{name}/prepare.py: {(r.stderr.strip().splitlines() or ['failed'])[-1]}")
    return out_dir


def graph_dir(args):
    """The prosqa_graph set, generated once: the paper's 14,785 / 257 / 419 graphs (--smoke: 60 / 12 / 12)."""
    d = os.path.join(args.tmp, "prosqa_graph")
    if not os.path.exists(os.path.join(d, "valid.json")):
        t, sizes = time.time(), ["--n_train", "60", "--n_valid", "12", "--n_test", "12"] if args.smoke else []
        prepare("prosqa_graph", d, *sizes)
        say(f"data: prosqa_graph generated ({'60/12/12' if args.smoke else '14,785/257/419'}) in {time.time() - t:.1f} s")
    return d


def gpt2_or_none():
    """(GPT-2's tokenizer or None, why not). Offline tiktoken's download fails, but a dead network may hang it
    instead: it gets 20 s in a thread."""
    local = os.path.join(ROOT, "tiktoken-cache")
    if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(local):
        os.environ["TIKTOKEN_CACHE_DIR"] = local
    box = {"why": "timed out"}

    def load():
        try:
            box["tok"] = gpt2_tokenizer()
        except Exception as e:
            box["why"] = type(e).__name__
    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(20)
    return box.get("tok"), box["why"]


def inputs(args, n_batch, n_questions):
    """A stage-6 training batch and prompts of generated ProsQA text with GPT-2's tokenizer, or else of the
    symbolic prosqa_graph records (about 3x shorter), a line saying which, and the model."""
    tok, why = (None, "--symbols") if args.symbols else gpt2_or_none()
    n = max(n_batch, n_questions)
    if tok is not None:
        d = prepare("prosqa", os.path.join(args.tmp, "prosqa"), "--n_train", "0", "--n_valid", str(n), "--n_test", "0")
        recs, what = load_records(os.path.join(d, "valid.json")), "data: generated ProsQA text, GPT-2 tokenizer"
    else:
        recs = load_records(os.path.join(graph_dir(args), "valid.json"))[:n]
        why = "--symbols" if args.symbols else f"no GPT-2 tokenizer ({why}: tiktoken's files are not here)"
        tok, what = symbol_tokenizer(recs), f"data: {why}, so symbolic prosqa_graph records and the symbol tokenizer"
    toks = [tokenize(r, tok) for r in recs]
    b = collate([make_example(t, STAGE, tok=tok) for t in toks[:n_batch]], pad_id=tok.pad_id, latent_id=tok.latent_id)
    b = {k: v.to(args.device) for k, v in b.items()}
    return b, [make_question(t, STAGE, tok=tok) for t in toks[:n_questions]], new_model(args, tok), what


def new_model(args, tok):
    """GPT-2 124M's shape (--smoke: 1 layer, 32 wide) with Coconut's 50,260 tokens, random weights, seed 0."""
    torch.manual_seed(0)
    shape = dict(n_layer=1, n_head=2, n_embd=32) if args.smoke else dict(n_layer=12, n_head=12, n_embd=768)
    return Coconut(GPT(GPTConfig(**shape, vocab_size=50260)), tok.latent_id, tok.start_id, tok.end_id,
                   tok.eos_id).to(args.device)


def compiled(model):
    """A copy with its blocks compiled as train.py --compile does, on fresh dynamo caches (its own graph count)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    m = copy.deepcopy(model)
    for block in m.gpt.transformer.h:
        block.compile(dynamic=True)
    return m


def graphs():
    """Graphs dynamo compiled, and frames left eager: each thought count is a graph of its own, and past torch's
    recompile limit the rest runs eager (train.py's training and validation share one cache)."""
    c, cfg = torch._dynamo.utils.counters, torch._dynamo.config
    eager, limit = c["frames"]["total"] - c["frames"]["ok"], getattr(cfg, "recompile_limit", None) or cfg.cache_size_limit
    return (f"{c['stats']['unique_graphs']} compiled graphs" +
            (f", {eager} frame(s) left eager (recompile limit {limit})" if eager else ""))


def step(model, b, ctx, norms=True):
    """One training forward+backward -> (loss, {parameter: gradient norm}) (norms=False: nothing, for timing)."""
    model.zero_grad(set_to_none=True)
    with ctx:
        loss, _ = model(b["input_ids"], b["attention_mask"], b["labels"], b["position_ids"])
    loss.backward()
    if norms:
        return loss.item(), {n: p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None}


def answers(model, questions, ctx):
    with ctx:
        return generate_batched(model, questions, NEW_TOKENS, batch_size=32)[0]


def norm(g):  # the global gradient norm from the per-tensor ones
    return sum(x * x for x in g.values()) ** 0.5


# -----------------------------------------------------------------------------
# The sections

def environment(args):
    say(f"torch {torch.__version__}, python {sys.version.split()[0]}, device {args.device}")
    if not args.cuda:
        return say("CUDA: skipped (no CUDA)")
    p = torch.cuda.get_device_properties(args.device)
    RESULTS.update(gpu=p.name, cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported())
    say(f"CUDA {torch.version.cuda}: {p.name}, {p.total_memory / 2**30:.1f} GiB; bf16 supported: "
        f"{torch.cuda.is_bf16_supported()}; TF32 matmul: {torch.backends.cuda.matmul.allow_tf32}")


def numerics(args):
    b, questions, model, what = inputs(args, 4 if args.smoke else 8, 4 if args.smoke else 32)
    say(f"{what}; {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; stage {STAGE}, batch "
        f"{tuple(b['input_ids'].shape)}")
    ref_loss, ref = step(model, b, contextlib.nullcontext())
    say(f"fp32 eager:    loss {ref_loss:.6f}, grad norm {norm(ref):.6f}")
    R = RESULTS["numerics"] = {"fp32 eager": dict(loss=ref_loss, grad_norm=norm(ref))}
    # compile must match eager to fp32 rounding (the gradients too); bf16 to ~1%
    for name, bf16, tol in [("bf16 autocast", True, 2e-2), ("fp32 compile", False, 1e-4)]:
        if not bf16 and no_compile(args):
            say(f"{name}:  {no_compile(args)}")
            continue
        t = time.time()
        loss, g = step(model if bf16 else compiled(model), b, autocast(args, bf16))
        rl, rg = abs(loss - ref_loss) / abs(ref_loss), abs(norm(g) - norm(ref)) / norm(ref)
        worst = max(abs(g[k] - ref[k]) / ref[k] for k in ref if ref[k] > 0)
        ok = rl <= tol and (bf16 or rg <= 1e-3)
        R[name] = dict(loss=loss, grad_norm=norm(g), rel_loss=rl, rel_grad_norm=rg, worst_tensor=worst, ok=ok)
        say(f"{name}: loss {loss:.6f} (rel diff {rl:.1e}), grad norm {norm(g):.6f} (rel diff {rg:.1e}, worst tensor "
            f"{worst:.1e}): {'PASS' if ok else 'FAIL'} (loss within {tol:g}{'' if bf16 else ', grad norm 1e-3'})" +
            ("" if bf16 else f"; {graphs()}, {time.time() - t:.0f} s with compilation"))
    eager = answers(model, questions, contextlib.nullcontext())
    n, line = len(questions), f"generation, {len(questions)} questions x {NEW_TOKENS} new tokens: fp32 compile "
    if no_compile(args):
        line += f"{no_compile(args)}; "
    else:
        same = R["generation compile identical"] = sum(a == e for a, e in zip(answers(
            compiled(model), questions, contextlib.nullcontext()), eager))
        line += f"vs eager identical {same}/{n}: {'PASS' if same == n else 'FAIL'} ({graphs()}); "
    same = R["generation bf16 identical"] = sum(a == e for a, e in zip(answers(model, questions, autocast(args, True)), eager))
    say(line + f"bf16 vs fp32 identical answers {same}/{n} (report only)")


def timing(args):
    n = 4 if args.smoke else 32  # 32: the paper's micro-batch
    b, questions, model, what = inputs(args, n, n)
    warmup, repeats = (1, 2) if args.smoke else (2, 5)
    say(f"{what}; training batch {tuple(b['input_ids'].shape)} at stage {STAGE}; {n} questions x {NEW_TOKENS} new "
        f"tokens in one batch; medians of {repeats} after {warmup} warm-up")

    def timed(fn):  # CUDA runs asynchronously: wait for the GPU on both ends
        if args.cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if args.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    R = RESULTS["timing"] = {}
    if args.cuda:  # first, while this is the only model on the GPU
        step(model, b, contextlib.nullcontext(), norms=False)  # cuBLAS' workspaces and such are part of the peak
        torch.cuda.reset_peak_memory_stats()
        step(model, b, contextlib.nullcontext(), norms=False)
        peak, adam = torch.cuda.max_memory_allocated() / 2**30, 8 * sum(p.numel() for p in model.parameters()) / 2**30
        R.update(peak_gib_fp32_step=peak, adamw_state_gib=adam)
        say(f"PEAK GPU MEMORY, one fp32 training step, batch {tuple(b['input_ids'].shape)}, stage {STAGE}: {peak:.2f} "
            f"GiB (weights, gradients, activations); with AdamW's state (+{adam:.2f} GiB) a paper run needs about "
            f"{peak + adam:.1f} GiB per GPU")
    else:
        say("peak GPU memory: skipped (no CUDA)")
    for name, bf16, comp in [("fp32 eager", False, False), ("bf16 eager", True, False), ("bf16 + compile", True, True)]:
        if comp and no_compile(args):
            say(f"{name}: {no_compile(args)}")
            continue
        m = compiled(model) if comp else model
        ts = [timed(lambda: step(m, b, autocast(args, bf16), norms=False)) for _ in range(warmup + repeats)]
        note = f" (first {ts[0]:.0f} s, compiling: {graphs()})" if comp else ""
        m = compiled(model) if comp else model  # generation on fresh caches, so that it is compiled too
        gs = [timed(lambda: answers(m, questions, autocast(args, bf16))) for _ in range(1 + repeats)]
        ms, qps = 1000 * statistics.median(ts[warmup:]), n / statistics.median(gs[1:])
        R[name] = dict(train_step_ms=ms, generation_questions_per_s=qps)
        say(f"{name}: training step {ms:.1f} ms{note}; generation {qps:.1f} questions/s" + (f" ({graphs()})" if comp else ""))


def fsdp(args):
    """
    A one-rank process group (nccl for the GPU as train.py's torchrun runs get it, gloo in --smoke) around
    parallel.shard with train.py's bf16 policy on a GPU (--dtype bfloat16: bf16 weights gathered, fp32 reduce),
    one Coconut step against the same step without FSDP (loss, gradient norm, peak memory), an AdamW step,
    then a sharded save and a load into a fresh sharded model: the same weights.
    """
    import torch.distributed as dist
    from machinery import parallel
    from machinery.parallel import load_sharded, save_sharded, shard
    cuda = args.cuda
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    dist.init_process_group(backend)
    try:
        b, _, model, what = inputs(args, 4 if args.smoke else 8, 1)
        bf16 = cuda  # as parallel.wrap: a CPU's LayerNorm refuses bf16 weights beside fp32 inputs, so fp32 there
        say(f"{what}; process group {backend}, world {parallel.world()}; parallel.shard with "
            f"{'bf16 weights (MixedPrecisionPolicy), fp32 reduce' if bf16 else 'fp32 weights'}; batch "
            f"{tuple(b['input_ids'].shape)} at stage {STAGE}")
        device = torch.device(args.device)
        plain = copy.deepcopy(model)
        ctx = autocast(args, bf16)  # train.py's step: bf16 autocast with --dtype bfloat16
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        ref_loss, ref = step(plain, b, ctx)
        ref_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        del plain
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        shard(model, device, bf16_weights=bf16)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        with parallel.gathered(model):  # as train_step: the gradients are the slices' once it ends
            with ctx:
                loss, _ = model(b["input_ids"], b["attention_mask"], b["labels"], b["position_ids"])
            loss.backward()
        loss, g = loss.item(), {n: p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None}
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        tol = 2e-2 if bf16 else 1e-5
        rl, rg = abs(loss - ref_loss) / abs(ref_loss), abs(norm(g) - norm(ref)) / norm(ref)
        ok = rl <= tol and rg <= 5 * tol
        R = RESULTS["fsdp"] = dict(backend=backend, loss=loss, loss_without=ref_loss, rel_loss=rl, rel_grad_norm=rg,
                                   ok=ok, peak_gib=peak, peak_gib_without=ref_peak)
        say(f"fsdp step: loss {loss:.6f} vs {ref_loss:.6f} without FSDP (rel diff {rl:.1e}), grad norm rel diff "
            f"{rg:.1e}: {'PASS' if ok else 'FAIL'} (loss within {tol:g}, grad norm {5 * tol:g})")
        say(f"fsdp peak GPU memory of the step: {peak:.2f} GiB, without FSDP {ref_peak:.2f} GiB" if cuda else
            "fsdp peak GPU memory: skipped (no CUDA)")
        optimizer.step()
        folder, t = os.path.join(args.tmp, "shards"), time.time()
        save_sharded(model, optimizer, folder)
        t_save = time.time() - t
        saved = {k: v.full_tensor().cpu() for k, v in model.state_dict().items()}
        _, _, fresh, _ = inputs(args, 1, 1)  # the weights before the step, which the load must replace
        shard(fresh, device, bf16_weights=bf16)
        t = time.time()
        load_sharded(fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-4), folder)
        loaded = {k: v.full_tensor().cpu() for k, v in fresh.state_dict().items()}
        same = sum(torch.equal(saved[k], loaded[k]) for k in saved)
        R.update(save_s=t_save, load_s=time.time() - t, identical=same, tensors=len(saved))
        say(f"fsdp sharded save {t_save:.1f} s, load {time.time() - t:.1f} s: identical tensors {same}/{len(saved)}: "
            f"{'PASS' if same == len(saved) else 'FAIL'}")
    finally:
        dist.destroy_process_group()
        for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):  # the run after it: one process
            os.environ.pop(k, None)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args):
    graph_dir(args)
    budget = left(args) - 20  # 20 s for what follows the run
    if args.smoke:  # 1 epoch per stage of a tiny model on 60 graphs
        stage_epochs, flags = 1, "--n_layer 1 --n_head 2 --n_embd 32 --batch_size 16 --threads 1".split()
    else:  # as many epochs per stage (up to 5) as the time left allows at EPOCH_GUESS_S each
        stage_epochs, flags = args.stage_epochs or max(1, min(5, int((budget - 30) / (5 * EPOCH_GUESS_S)))), []
    dtype, out = "bfloat16" if args.cuda else "float32", os.path.join(args.tmp, "run")
    cmd = ["train.py", "--dataset", "prosqa_graph", "--data_dir", args.tmp, "--out_dir", out, "--device", args.device,
           "--dtype", dtype, "--stage_epochs", str(stage_epochs), "--epochs", str(5 * stage_epochs), "--log_every", "30",
           *flags]
    say(f"$ python {' '.join(cmd).replace(args.tmp, '$TMP')}")
    say(f"(stages 0-4 of {stage_epochs} epoch(s) each, {dtype}; the recipe: 25 epochs per stage, 300 in all, fp32; "
        f"stopped after {max(budget, 0):.0f} s if not done)")
    if budget < 30:
        return say(f"skipped: {left(args):.0f} s left of --budget_s {args.budget_s:.0f}")
    t, stopped, rc, log_path = time.time(), False, 0, os.path.join(args.tmp, "train.log")
    with open(log_path, "w") as log:
        try:  # killed at the budget: train.py has written every finished epoch to metrics.jsonl already
            rc = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                timeout=budget).returncode
        except subprocess.TimeoutExpired:
            stopped = True
    wall, path = time.time() - t, os.path.join(out, "metrics.jsonl")
    metrics = [json.loads(x) for x in open(path)] if os.path.exists(path) else []
    if OUT:
        for f in [log_path] + ([path] if metrics else []):
            shutil.copy(f, OUT)
    if rc and not stopped:
        raise RuntimeError(f"train.py exited with {rc}: {(open(log_path).read().strip().splitlines() or [''])[-1]}")
    say(f"{'stopped at the budget' if stopped else 'finished'} after {len(metrics)} epoch(s), {wall:.0f} s wall")
    if not metrics:
        return
    say(f"{'stage':>5} {'epochs':>7} {'val_acc':>8} {'s/epoch':>8} {'seconds':>8}")
    per_stage, R = {}, RESULTS.setdefault("run", dict(epochs=len(metrics), wall_s=wall, stopped=stopped, stages={}))
    for s in sorted({m["stage"] for m in metrics}):
        ms = [m for m in metrics if m["stage"] == s]
        per_stage[s] = statistics.mean(m["epoch_seconds"] for m in ms)
        acc = [m["val_acc"] for m in ms if "val_acc" in m][-1:]
        upto = sum(m["epoch_seconds"] for m in metrics if m["epoch"] <= ms[-1]["epoch"])
        R["stages"][s] = dict(val_acc=acc[0] if acc else None, seconds_per_epoch=per_stage[s])
        say(f"{s:>5} {ms[0]['epoch']:>4}-{ms[-1]['epoch']:<2} {f'{100 * acc[0]:.2f}%' if acc else '-':>8} "
            f"{per_stage[s]:8.1f} {upto:8.0f}")
    # The recipe: 25 epochs at each of stages 0-3, then 200 all-latent epochs at stage 4's cost (a stage not
    # reached here costs what the last one reached did: a lower bound). What the epochs' own seconds miss
    # (startup, each epoch's examples, checkpoints) is spread over them.
    extra = max(wall - sum(m["epoch_seconds"] for m in metrics), 0) / len(metrics)
    full = R["full_recipe_estimate_s"] = sum(per_stage.get(min(e // 25, 4), per_stage[max(per_stage)]) + extra
                                             for e in range(300))
    say(f"the full recipe (300 epochs, batch 256) at these speeds, {dtype}: about {full / 60:.0f} min "
        f"({extra:.1f} s per epoch outside the epochs' own seconds: startup, examples, checkpoints)")


def main(argv=None):
    p = Parser(prog="machinery/gpu_check.py", description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--budget_s", type=float, default=540, help="seconds for everything; the run takes what is left")
    p.add_argument("--skip", default="", help="comma list of sections to skip: numerics,timing,fsdp,run")
    p.add_argument("--smoke", action="store_true", help="a tiny version of every section (CPU, seconds)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--stage_epochs", type=int, default=0, help="the run's epochs per stage (0: from the time left)")
    p.add_argument("--symbols", action="store_true", help="sections 2-3 on symbolic records even with GPT-2's tokenizer")
    args = p.parse_args(argv)
    skip, sections = set(filter(None, args.skip.split(","))), dict(numerics=numerics, timing=timing, fsdp=fsdp, run=run)
    if skip - set(sections):
        p.error(f"--skip: unknown section(s) {', '.join(sorted(skip - set(sections)))}; expected "
                f"numerics,timing,fsdp,run")
    args.cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    if OUT:
        os.makedirs(OUT, exist_ok=True)
    if args.smoke:
        torch.set_num_threads(1)  # a tiny model gains nothing from threads, and on a busy machine they spin
    say(f"gpu_check.py{' --smoke' if args.smoke else ''}: budget {args.budget_s:.0f} s")
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as args.tmp:
        for i, (name, fn) in enumerate([("environment", environment)] + list(sections.items()), 1):
            if name in skip:
                continue
            say(f"\n== {i}. {name}")
            t = time.time()
            try:
                fn(args)
            except Exception as e:
                traceback.print_exc()  # to stderr, for whoever debugs it; the log keeps one line
                say(f"FAILED: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
            if args.cuda:
                torch.cuda.empty_cache()
            say(f"-- {name}: {time.time() - t:.1f} s")
            if OUT:
                with open(os.path.join(OUT, "results.json"), "w") as f:
                    json.dump(RESULTS, f, indent=1)
    say(f"\ntotal {time.time() - T0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
