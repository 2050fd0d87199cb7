"""
Several processes under torchrun: the process group, the model wrapped for data parallelism, and what
crosses between processes (gathered objects, whole state dicts for a checkpoint, a finite check).

    DDP (the default)   every process holds the whole model, its gradients and AdamW's two moments, and
                        gradients are all-reduced once per optimizer step.
    FSDP (--fsdp)       fully_shard (FSDP2): every process keeps a dim-0 slice (a DTensor) of each weight,
                        its gradient and AdamW's moments, 1/N of each; a group of weights (one transformer
                        block, or the rest of the model: embeddings, final norm, lm_head) is all-gathered
                        when it is computed with, and gradients are reduce-scattered back to the slices.

FSDP and Coconut's thought loop. With n thoughts a micro-batch runs every block n + 1 times (coconut.py's
passes), forward and backward. fully_shard's default frees a block's gathered weights after each call and
gathers them again for the next, in the backward too: 1 + 2L(n + 1) all-gathers per micro-batch for L
blocks. Worse, the count follows the number of thoughts, and processes whose micro-batches hold different
numbers of thoughts would wait on each other's collectives forever. Here every group is gathered once per
optimizer step instead (`gathered`): L + 1 all-gathers, whatever n and the number of micro-batches, and
generation, whose processes run different numbers of passes, runs on weights gathered once for the whole
validation, with no collective at all. Gradients are still reduce-scattered once per group and micro-batch,
not once per pass, and why rests on how autograd and FSDP2 (torch 2.13) work, not on a documented contract:
a block's weights are leaves of the graph, used in n + 1 passes, and autograd accumulates their n + 1 gradient
contributions in one buffer and writes .grad once, after the last of them (pass 0's, the last in the backward).
FSDP2's post-backward hook fires once per call of the block (n + 1 times), but reduce-scatters only the weights
whose .grad is set, and clears it: the hooks that run before autograd writes .grad find nothing to reduce, the
first one after it finds the whole sum, the ones after that nothing again. tests/test_fsdp.py counts the
collectives per step (TRAIN_TEST_COLLECTIVES), with processes whose micro-batches hold different numbers of
thoughts: L + 1 all-gathers and (L + 1) x micro-batches reduce-scatters, so a torch that changed this would
fail there first. The cost in memory: the model's whole weights are held during the step, as DDP holds them
all the time (on a GPU with --dtype bfloat16 the blocks' in bf16, 2 bytes per parameter), beside each process's
1/N of the fp32 weights, gradients and AdamW moments (16 bytes per parameter in all). The whole gradients exist
during Coconut's backward under either choice: autograd holds each block's sum over the passes until the first
pass's turn.
"""
import contextlib
import gc
import os
import shutil
import warnings

import torch
import torch.distributed as dist

# Coconut's KV cache leaves a block as views of its projections; FSDP2 warns that an in-place op on such a view
# would skip its backward hook. Nothing writes into the cache in place (gpt.py, llama.py): the warning says nothing.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def setup():
    """
    Joins torchrun's process group -> (rank, local_rank, world), or (0, 0, 1) without torchrun. On CUDA
    the GPUs' collectives go through nccl and the CPU tensors' (the step's loss, gathered objects) through
    gloo; TRAIN_BACKEND=gloo puts everything on gloo (the tests).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 0, 1
    cuda = torch.cuda.is_available() and os.environ.get("TRAIN_BACKEND") != "gloo"
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    if os.environ.get(COUNT_HOOK):
        count_collectives()
    return dist.get_rank(), int(os.environ.get("LOCAL_RANK", dist.get_rank())), dist.get_world_size()


COUNT_HOOK = "TRAIN_TEST_COLLECTIVES"  # tests: every process prints the collectives of each `gathered` block
COUNTS = {}


def count_collectives():
    """Counts the collectives that FSDP2 calls (torch.distributed.all_gather_single and reduce_scatter_single in
    torch 2.13), for `gathered` to print: the tests check how many reduce-scatters a step makes."""
    for name in ("all_gather_single", "reduce_scatter_single"):
        def counted(*a, _name=name, _fn=getattr(dist, name), **k):
            COUNTS[_name] = COUNTS.get(_name, 0) + 1
            return _fn(*a, **k)
        setattr(dist, name, counted)


def teardown():
    """Leaves the process group, if any. FSDP's modules and DTensors hold it in reference cycles: collected first,
    so that the group's threads stop here and not during the interpreter's exit, where gloo aborted at times."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank():
    """This process's GPU on its node (torchrun's LOCAL_RANK), 0 in one process."""
    return int(os.environ.get("LOCAL_RANK", rank())) if dist.is_initialized() else 0


def check_args(args):
    """--fsdp needs several processes, and runs eagerly: one line each (a resumed FSDP run may go on in one)."""
    if args.fsdp and world() == 1 and "fsdp" in args.typed:
        raise ValueError("--fsdp shards the model over several processes: start it with `torchrun "
                         "--nproc_per_node N train.py ... --fsdp` (one process holds the whole model anyway)")
    if args.fsdp and args.compile and world() > 1:
        raise ValueError("--fsdp with --compile is not supported yet (the sharded step is tested eagerly only): "
                         "drop --compile, or train with DDP (without --fsdp)")
    if args.grad_accum % world():
        raise ValueError(f"--grad_accum {args.grad_accum} must be a multiple of the {world()} processes")


def barrier():
    """Every process waits here for the others (nothing without torchrun): an all-reduce of a CPU tensor, which
    goes through gloo beside nccl, where dist.barrier() on nccl would guess each process's GPU from its rank."""
    if world() > 1:
        dist.all_reduce(torch.zeros(1))


def any_rank(flag):
    """Is flag true in any process? (A collective: every process calls it; all get the same answer.)"""
    if world() == 1:
        return bool(flag)
    t = torch.tensor([float(bool(flag))])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() > 0


def gather(obj):
    """Every process's obj, in rank order (a list of one without torchrun)."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


# -----------------------------------------------------------------------------
# The model as a step runs it

def wrap(model, device, fsdp=False, bf16=False):
    """
    The model that train_step calls: the Coconut model itself in one process, DDP around it, or with fsdp
    the model itself sharded in place (`shard`). The optimizer is made afterwards, on model.parameters().
    """
    if world() == 1:
        return model
    if not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    # a CPU's autocast leaves LayerNorm's weights in their dtype: there the weights stay fp32, as in one process
    shard(model, device, bf16_weights=bf16 and device.type == "cuda")
    return model


def blocks_of(model):
    """The transformer blocks of a Coconut model's GPT or Llama (model.gpt.transformer.h), or []."""
    return list(getattr(getattr(model.gpt, "transformer", {}), "h", None) or [])


def shard(model, device, bf16_weights=False):
    """
    fully_shard each transformer block, then the Coconut model (the root: embeddings, final norm, lm_head),
    over all processes, for `gathered`: nothing is freed after a forward or a backward, `gathered` frees it.
    bf16_weights (--dtype bfloat16 on a GPU): the blocks' weights are gathered and computed with in bf16 and
    their gradients reduced in fp32 (MixedPrecisionPolicy); the master weights and AdamW stay fp32. The
    blocks' inputs are not cast and the root keeps fp32 weights, so that under the step's bf16 autocast the
    residual stream, the norms, the embeddings and lm_head compute as with --dtype bfloat16 under DDP: the
    matmuls in bf16, the rest in fp32; the norms' weights are the only ones rounded to bf16 first.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    blocks = blocks_of(model)
    if not blocks:
        raise ValueError(f"--fsdp: the {type(model.gpt).__name__} has no transformer blocks "
                         f"(model.gpt.transformer.h) to shard: run it with DDP (without --fsdp)")
    mesh = init_device_mesh(device.type, (world(),))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
          if bf16_weights else MixedPrecisionPolicy())
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    model.set_reshard_after_backward(False)


def is_sharded(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model):
    """
    FSDP: every group's weights all-gathered once (the root's, then the blocks' in order: the same
    collectives in every process), kept for whatever runs inside (an optimizer step's micro-batches with
    all their thought passes, forward and backward; or a whole validation), then freed. Otherwise nothing.
    """
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    COUNTS.clear()
    for m in groups:
        m.unshard()
    try:
        yield
    finally:
        for m in groups:
            m.reshard()
    if os.environ.get(COUNT_HOOK):
        print(f"collectives (rank {rank()}): {COUNTS.get('all_gather_single', 0)} all-gathers, "
              f"{COUNTS.get('reduce_scatter_single', 0)} reduce-scatters", flush=True)


def no_sync(step_model, last):
    """DDP: gradients are all-reduced at the micro-batch that ends the step, not before. FSDP reduce-scatters
    every micro-batch's (holding whole gradients from one micro-batch to the next would cost what it saves)."""
    if last or not hasattr(step_model, "no_sync"):
        return contextlib.nullcontext()
    return step_model.no_sync()


# -----------------------------------------------------------------------------
# Checkpoints: the same whole tensors whatever the number of processes and the wrapping

def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _whole(t, keep, done):
    """A DTensor all-gathered (every process calls this, in the same order); the copy kept on the CPU only
    where keep. A tensor met before (GPT's tied wte and lm_head) is gathered once and stays shared."""
    if id(t) not in done:
        if hasattr(t, "full_tensor"):
            whole = t.full_tensor()  # a collective: every process, keep or not
            done[id(t)] = whole.cpu() if keep else None
        else:
            done[id(t)] = t
    return done[id(t)]


def whole_state(model, optimizer, keep):
    """
    -> (the GPT's state dict, AdamW's state dict), in the formats of model.gpt.state_dict() and
    optimizer.state_dict() with whole tensors, as one process would save them: the weights and the moments
    are the same file whatever the number of processes or --fsdp. Every process calls it; the tensors are
    kept on the CPU where keep (rank 0, which writes the file), None elsewhere. Gathering on one process
    holds the weights and moments in its CPU memory: 12 bytes per parameter.
    """
    if not is_sharded(model):
        return model.gpt.state_dict(), optimizer.state_dict()
    done = {}
    with torch.no_grad():
        weights = {k: _whole(v, keep, done) for k, v in model.gpt.state_dict(keep_vars=True).items()}
        adam = optimizer.state_dict()
        adam["state"] = {i: {k: _whole(v, keep, done) for k, v in s.items()} for i, s in adam["state"].items()}
    return weights, adam


def save_sharded(model, optimizer, folder):
    """
    train.py --fsdp sharded: every process writes its slices of the weights and AdamW's state into folder
    (torch.distributed.checkpoint: one file per process and a .metadata), nothing gathered anywhere. The folder
    is written under a temporary name and renamed when complete: the file that names it, written afterwards,
    never names half of one.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    first = dist.get_rank() == 0
    if first and os.path.exists(folder + ".tmp"):  # left by a run killed while saving
        shutil.rmtree(folder + ".tmp")
    dist.barrier()
    weights, adam = get_state_dict(model, optimizer)
    dcp.save({"model": weights, "optimizer": adam}, checkpoint_id=folder + ".tmp")  # returns when all have written
    if first:
        if os.path.exists(folder):  # saved by a run killed before the file that would name it was written
            shutil.rmtree(folder)
        os.replace(folder + ".tmp", folder)


def load_sharded(model, optimizer, folder):
    """The weights and AdamW's state of save_sharded's folder into the model and optimizer, whatever the
    number of processes now (torch.distributed.checkpoint reads each process's part of every tensor)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    weights, adam = get_state_dict(model, optimizer)
    state = {"model": weights, "optimizer": adam}
    with warnings.catch_warnings():  # one process: "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=folder, no_dist=world() == 1)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_optimizer(optimizer, state):
    """AdamW's whole state (whole_state's, or one process's optimizer.state_dict()) into an optimizer over
    sharded or whole parameters: under FSDP each process keeps its slice of each moment. The tensors are copied:
    a memory-mapped checkpoint's file is not kept open by the moments (and its disk space with it)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = dict(state, state={i: {k: v.clone() if torch.is_tensor(v) and not hasattr(params[i], "device_mesh") else v
                                   for k, v in s.items()} for i, s in state["state"].items()})
    if any(hasattr(p, "device_mesh") for p in params):
        from torch.distributed.tensor import distribute_tensor
        state = dict(state, state={i: {k: distribute_tensor(v.to(params[i].device), params[i].device_mesh,
                                                             params[i].placements, src_data_rank=None)
                                       if torch.is_tensor(v) and v.shape == params[i].shape and v.dim() else v
                                       for k, v in s.items()} for i, s in state["state"].items()})
    optimizer.load_state_dict(state)


def all_finite(model):
    """Are all weights finite in every process? (Each checks its own slices; all agree on the answer.)"""
    ok = torch.tensor([float(all(bool(torch.isfinite(_local(p)).all()) for p in model.parameters()))])
    if world() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return ok.item() == 1.0


def held_bytes(model, optimizer):
    """-> (bytes of weights and AdamW state this process holds, bytes of the whole): its slices under FSDP."""
    tensors = list(model.parameters()) + [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return (sum(_local(t).numel() * _local(t).element_size() for t in tensors),
            sum(t.numel() * _local(t).element_size() for t in tensors))
