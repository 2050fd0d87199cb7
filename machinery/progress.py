"""
What train.py prints while it runs: the lines before the first step (what the run is, its notes), a progress line
with tokens/s and the ETA of the epoch and of the run, the notes after the first step, and the tables at the end.
Every line comes from rank 0 alone under torchrun.
"""
import time

from curriculum import SET_LABELS, stage_name
from machinery import parallel
from machinery.checkpoint import LATENT_MODES

SLOW_RUN_HOURS = 2  # a CPU run estimated longer than this after its first step is told about the demo
SHARDED_CHECKPOINTS_ABOVE = 3e9  # parameters: above, --fsdp whole is told about --fsdp sharded


def log(*a, **k):
    if parallel.rank() == 0:
        print(*a, **k, flush=True)


def fmt_time(s):
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def fmt_bytes(b):
    return f"{b / 2**30:.3g} GiB" if b >= 2**30 else f"{b / 2**20:.3g} MiB"


# what thought k is trained on, by --thought_labels: the run's first lines (0, the paper's, needs none) and
# sample.py --analyze (report.layer_split) say it in these words
THOUGHT_LABELS = {"0": "nothing (the paper)",
                  "1": "the gold path's node of layer k, the step it replaces (as CoT's)",
                  "frontier": "the frontier, the nodes k roads from the start (never the path)",
                  "within": "every node within k roads of the start (never the path)"}


def start_lines(args, n_train, n_val, per_epoch, model, device, bf16, ckpt_path, continue_command):
    """The run's first lines: what trains on what, how many steps, where it saves and how it continues."""
    n_epochs = args.epochs - args.start_epoch
    sharded = " sharded (FSDP)" if parallel.is_sharded(model) else ""
    log(f"{args.mode} on {args.dataset}: {n_train} train / {n_val} valid records; "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; {args.batch_size} x {args.grad_accum} "
        f"sequences per step; {parallel.world()} process(es){sharded} on {device}, {'bfloat16' if bf16 else 'float32'}")
    if args.mode in ("coconut", "pause_as_thought", "no_curriculum") and args.thought_labels:
        how = ""
        if args.thought_labels in SET_LABELS:
            how = (", scored against an even spread over it (--set_loss spread): a set of n nodes costs at least "
                   "ln n nats (1.10 for 3), so the loss stays above a run's without set labels"
                   if args.set_loss == "spread" else ", scored by the set's mass (--set_loss mass)")
        log(f"thought k's label: {THOUGHT_LABELS[str(args.thought_labels)]}{how}")
    log(f"{per_epoch} optimizer steps per epoch, {per_epoch * n_epochs} in the whole run ({n_epochs} epoch"
        f"{'' if n_epochs == 1 else 's'}); validation writes up to {args.max_new_tokens} tokens per question")
    when = f"after every epoch{f' and every {args.save_every} steps' if args.save_every else ''}"
    if args.resume:  # there is a checkpoint to continue from
        log(f"{ckpt_path} is saved {when}; a run stopped in any way, even killed, continues with `{continue_command}`")
    else:  # the promise waits for the first save (saved_line)
        log(f"{ckpt_path} is saved {when} and on Ctrl-C or SIGTERM; until the first save, a run killed starts again")


def saved_line(ckpt_path, step, continue_command):
    """Said at a new run's first save: from now on it continues."""
    return (f"saved {ckpt_path} (step {step}): from now on a run stopped in any way, even killed, continues with "
            f"`{continue_command}`")


def run_notes(args, records, per_epoch, model=None):
    """What the first lines should warn about: too few steps to learn, stages with no step left to replace,
    whole checkpoints of a sharded model that big."""
    notes = []
    n = sum(p.numel() for p in model.parameters()) if model is not None else 0
    if args.fsdp == "whole" and parallel.is_sharded(model) and n > SHARDED_CHECKPOINTS_ABOVE:
        notes.append(f"every save gathers the whole weights and AdamW's state of these {n / 1e9:.1f}B parameters "
                     f"into rank 0's CPU memory ({fmt_bytes(12 * n)}): --fsdp sharded has each process write its own")
    total = per_epoch * (args.epochs - args.start_epoch)
    if args.init_from == "scratch" and total < 500:
        notes.append(f"{total} optimizer steps may be too few for a model from scratch (the demo takes 2,000): "
                     f"a smaller --batch_size or more --epochs gives more")
    longest = max((len(r["steps"]) for r in records), default=0)
    if args.mode in LATENT_MODES and args.max_latent_stage > longest:
        # the official curriculum: stage k feeds k*c thoughts even to a record of fewer steps
        notes.append(f"--max_latent_stage {args.max_latent_stage} is past the records' longest chain ({longest} "
                     f"steps): stages {longest + 1}-{args.max_latent_stage} replace no more steps but still add "
                     f"thoughts, up to {args.max_latent_stage * args.c_thought} per question; --max_latent_stage "
                     f"{longest} matches the data")
    return notes


def first_step_notes(model, optimizer, device, run_eta):
    """After the run's first step (every process calls it): what each process holds, now that AdamW's moments
    exist, and whether the run is a GPU recipe at this speed."""
    if parallel.world() > 1:
        log(held_line(model, optimizer))
    note = slow_run_note(run_eta, device)
    if note:
        log(note)


def slow_run_note(run_seconds, device):
    """
    After the first step, from the run's estimated time on this device: a CPU run of many hours (the
    paper's GPT-2 runs, the superposition recipe) is a GPU recipe; say so rather than let it look stuck.
    """
    if device.type == "cpu" and run_seconds > SLOW_RUN_HOURS * 3600:
        return (f"note: at this speed the run takes about {fmt_time(run_seconds)} on this CPU: this is a GPU "
                f"recipe. The CPU demo is `python train.py --demo` (minutes).")
    return None


def held_line(model, optimizer):
    """What each process holds of the weights and AdamW's state, measured (every process calls it)."""
    held = parallel.gather(parallel.held_bytes(model, optimizer))
    how = "slices (FSDP)" if parallel.is_sharded(model) else "whole copies (DDP)"
    return (f"weights and AdamW state held per process: {', '.join(fmt_bytes(h) for h, _ in held)} "
            f"({how}; {fmt_bytes(held[0][1])} in all)")


class Meter:
    """Times an epoch's steps for the progress lines: tokens/s, and the ETA of the epoch and of the run."""

    def __init__(self, first_step):
        self.t0 = self.t_log = time.time()
        self.first, self.tokens = first_step, 0

    def seconds(self):
        return time.time() - self.t0

    def progress(self, state, loss, n_tokens, n_steps, args):
        """Logs a progress line when due (the epoch's first and last step, then every log_every seconds);
        returns the run's ETA in seconds when it did, else None."""
        self.tokens += n_tokens
        now, k = time.time(), state["epoch_step"]
        if now - self.t_log < args.log_every and k != self.first + 1 and k != n_steps:
            return None
        per_step = (now - self.t0) / (k - self.first)
        val = [m["epoch_seconds"] - m["train_seconds"] for m in state["metrics"]][-1:] or [0.0]
        epoch_eta = per_step * (n_steps - k)
        run_eta = epoch_eta + (args.epochs - state["epoch"] - 1) * (per_step * n_steps + val[0]) + val[0]
        log(f"{stage_name(state['stage'], vars(args))} | epoch {state['epoch'] + 1}/{args.epochs} | "
            f"step {k}/{n_steps} ({state['step']}) | loss {loss:.4f} | {self.tokens / max(now - self.t_log, 1e-9):,.0f} tok/s | "
            f"ETA epoch {fmt_time(epoch_eta)}, run {fmt_time(run_eta)}")
        self.t_log, self.tokens = now, 0
        return run_eta


def stage_table(metrics, cfg=None):
    """
    Validation accuracy at the last evaluated epoch of each stage. cfg (train.py's vars(args)): the stages past
    max_latent_stage, which all train alike, are one row named as curriculum.stage_name names it ("last, 4 thoughts").
    """
    groups = {}  # a stage's printed name -> its epochs' metrics, in order
    for m in metrics:
        name = stage_name(m["stage"], cfg) if cfg else f"stage {m['stage']}"
        groups.setdefault(name.replace("the last stage", "stage last"), []).append(m)
    width = max([5] + [len(n) - len("stage ") for n in groups])
    rows = [f"{'stage':>{width}} {'epochs':>7} {'steps':>6} {'accuracy':>9}"]
    for name, ms in groups.items():
        evaluated = [m for m in ms if "val_acc" in m]
        if evaluated:
            first, last = ms[0]['epoch'], evaluated[-1]['epoch']
            epochs = f"{first}" if first == last else f"{first}-{last}"
            rows.append(f"{name[len('stage '):]:>{width}} {epochs:>7} {evaluated[-1]['step']:>6} "
                        f"{100 * evaluated[-1]['val_acc']:8.2f}%")
    return "\n".join(rows)
