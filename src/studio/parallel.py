"""Several GPUs, one image: `--gpus N` or `torchrun --nproc-per-node N src/app.py ...`.

Every rank loads the whole pipeline on its own GPU with the offload mode it would use alone (two 24 GB cards:
the budget engine on each) and runs the same `infer` on the same job. Rank 0 alone serves the UI or the CLI: `infer`
hands it each job (`share_job`); the other ranks wait in `serve_rank` and never open a port. The app passes in the
functions it needs (`main` for the ranks it starts, `infer` for the jobs they serve): this module imports no `app`.
"""

import dataclasses
import datetime
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from studio.errors import OutOfMemoryError, RunStopped

logger = logging.getLogger(__name__)


# Every rank loads the whole pipeline on its own GPU with the offload mode it would use alone (two 24 GB cards:
# the budget engine on each) and runs the same `infer` on the same job. Rank 0 alone serves the UI or the CLI:
# `infer` hands it each job (`share_job`); the other ranks wait in `serve_rank` and never open a port.
# The transformer calls are split between the ranks:
#   CFG-parallel      true CFG makes two transformer calls a step (cond, then uncond). The ranks form two
#                     halves: the first computes cond, the second uncond, and each rank pair swaps its result
#                     (`CfgParallelHook`, installed by `enable_multi_gpu`). diffusers 0.42.1 has no CFG-parallel (its
#                     `enable_parallelism` splits one call: context or tensor parallel), hence a hook of a few lines.
#   context parallel  with 4+ ranks (or an odd count) the ranks of each half split every call's sequence with
#                     diffusers' own Ulysses attention (`ContextParallelConfig`, QwenImageTransformer2DModel's
#                     `_cp_plan`). Measured only on 2 GPUs, where it is not used.
# The layers equal one process's: the same CPU-generator noise and the same two predictions every step.
# The caption is written by rank 0 alone and sent to the others (`caption_from_rank0`): decoding is one token after
# another, so other GPUs could only repeat it; it costs what it costs on one GPU.
# The ranks stay in step, or a rank would wait in a collective for one that left: a Stop is rank 0's answer sent to
# every rank at each step end (`rank0_says`), a caption rank 0 did not finish stops them all, and an out-of-memory
# error in one rank's CFG half is agreed on before the swap (`CfgParallelHook`), so every rank raises it.
MULTI_GPU_JOB_TIMEOUT = datetime.timedelta(days=365)  # how long ranks 1.. wait for rank 0's next job (UI idle time)


@dataclasses.dataclass
class ParallelState:
    """This process's place among the ranks (`init_distributed`)."""

    rank: int
    world_size: int
    job_group: Any  # a gloo group: jobs are Python objects (the image, the parameters) sent from rank 0
    mesh: Any  # DeviceMesh ("cfg", "ring", "ulysses") for 3+ ranks; None for 2 (the default group is the pair)
    cfg_size: int  # 2: CFG-parallel halves; 1: none (an odd number of ranks)
    cp_size: int  # ranks per half that split each transformer call (context parallel); 1: none


def ranks_on_this_machine() -> int:
    """How many ranks of `--gpus N` / torchrun run on this machine (LOCAL_WORLD_SIZE); 1 alone."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def check_gpus(gpus: int, available: int) -> None:
    """`--gpus N` needs N GPUs on this machine."""
    if gpus < 1:
        raise ValueError(f"--gpus {gpus}: use 1 or more")
    if gpus > available:
        raise ValueError(f"--gpus {gpus} needs {gpus} CUDA GPUs, this machine has {available}: use --gpus {max(available, 1)}"
                         + (", or run without --gpus" if available <= 1 else ""))


def launch_ranks(gpus: int, argv: list[str], main: Callable[[list[str]], int]) -> int:
    """`--gpus N`: start N ranks of this same command on this machine (what torchrun would do), each running
    `main(argv)` (the app's); returns rank 0's exit code."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:  # a free port for the ranks' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        mp.spawn(_rank_main, args=(gpus, port, argv, main), nprocs=gpus, join=True)
    except mp.ProcessExitedException as err:  # a rank exited non-zero (rank 0: some images failed)
        return err.exit_code if err.exit_code > 0 else 1
    return 0


# Set by `launch_ranks` in its ranks: they all run on this machine, so they meet on the loopback (`loopback_store`).
LOOPBACK_RANKS_VARIABLE = "QIL_RANKS_ON_LOOPBACK"


def _rank_main(local_rank: int, gpus: int, port: int, argv: list[str], main: Callable[[list[str]], int]) -> None:
    """One rank started by `launch_ranks`: torchrun's environment variables, then `main` as usual. The ranks talk over
    the loopback only: gloo and NCCL open their sockets on its interface (their *_SOCKET_IFNAME), the store on it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(gpus), LOCAL_WORLD_SIZE=str(gpus),
                      RANK=str(local_rank), LOCAL_RANK=str(local_rank), **{LOOPBACK_RANKS_VARIABLE: "1"})
    loopback = loopback_interface()
    if loopback is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", loopback)
    code = main(argv)
    if code:
        sys.exit(code)


def loopback_interface() -> str | None:
    """The name of the network interface that holds 127.0.0.1 ("lo" on Linux); None where none is found."""
    import psutil

    return next((name for name, addresses in psutil.net_if_addrs().items()
                 if any(address.address == "127.0.0.1" for address in addresses)), None)


def loopback_store(rank: int, world_size: int, port: int):
    """The ranks' rendezvous store for `--gpus N`, listening on 127.0.0.1:`port` only (rank 0 holds it, the others
    connect): torch's own TCPStore server, which `init_process_group`'s env:// makes, listens on every interface."""
    import socket

    import torch.distributed as dist

    if rank != 0:
        return dist.TCPStore("127.0.0.1", port, world_size, False)
    listener = socket.socket()
    listener.bind(("127.0.0.1", port))
    listener.listen()
    return dist.TCPStore("127.0.0.1", port, world_size, True, master_listen_fd=listener.detach())


def init_distributed() -> ParallelState | None:
    """Join the ranks started by `launch_ranks` or torchrun (env WORLD_SIZE > 1); None when running alone.

    NCCL on CUDA (one GPU per rank: LOCAL_RANK), gloo on the CPU (the tests' two-process run).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    # The ranks `launch_ranks` started meet on the loopback; torchrun's own store is torchrun's (its --rdzv flags).
    store = loopback_store(rank, world_size, int(os.environ["MASTER_PORT"])) \
        if os.environ.get(LOOPBACK_RANKS_VARIABLE) else None
    if torch.cuda.is_available():
        check_gpus(ranks_on_this_machine(), torch.cuda.device_count())
        torch.cuda.set_device(local_rank)  # "cuda" means this rank's GPU from here on
        # No `device_id=` (eager NCCL init): with it, torch 2.11 creates sub-groups by ncclCommSplit at their first
        # collective, which hung the first CFG swap on 2 H200s (NCCL 2.28.9; the same hang: NVIDIA-NeMo/RL#3189).
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world_size)
    else:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    job_group = dist.new_group(backend="gloo", timeout=MULTI_GPU_JOB_TIMEOUT)
    cfg_size = 2 if world_size % 2 == 0 else 1
    cp_size = world_size // cfg_size
    # Two ranks swap over the default group; more need the mesh's sub-groups (cfg pairs, context-parallel halves).
    mesh = None if cp_size == 1 else init_device_mesh("cuda" if torch.cuda.is_available() else "cpu",
                                                      (cfg_size, 1, cp_size), mesh_dim_names=("cfg", "ring", "ulysses"))
    logger.info("Rank %d of %d: %s", rank, world_size,
                f"CFG-parallel halves of {cp_size} rank(s)" if cfg_size == 2 else f"context parallel over {cp_size} ranks")
    return ParallelState(rank, world_size, job_group, mesh, cfg_size, cp_size)


class _NoState(BaseState):
    """CfgParallelHook's StateManager needs a state class; the hook keeps none of its own there."""

    def reset(self, *args, **kwargs):
        pass


class CfgParallelHook(ModelHook):
    """Cond on the first half, uncond on the second; the prediction a rank skips comes from its pair.

    Stateful only to receive the pipeline's `cache_context` name ("cond" / "uncond") through its StateManager.
    A skipped call returns an empty tensor that is filled in place by the swap after the uncond call: the
    pipeline only slices the cond prediction before the uncond call, and a slice is a view of it.
    """

    _is_stateful = True

    def __init__(self, group, half: int, flag_group):
        super().__init__()
        self.group, self.half, self.flag_group = group, half, flag_group
        self.state_manager = StateManager(_NoState)
        self.enabled = False  # per job (`share_job`): only true CFG makes the uncond call
        self.predictions: list = [None, None]
        self.out_of_memory = False  # this rank's half ran out of GPU memory this step

    @staticmethod
    def empty_prediction(module, args, kwargs) -> torch.Tensor:
        """The uninitialized prediction of the shape and dtype the transformer's forward returns."""
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        channels = module.config.out_channels * module.config.patch_size**2
        # The dtype the pair's forward returns: autocast's (bf16 on CUDA) where it is on, else the weights'.
        device_type = hidden_states.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else module.dtype
        return hidden_states.new_empty((*hidden_states.shape[:2], channels), dtype=dtype)

    def new_forward(self, module, *args, **kwargs):
        if not self.enabled:
            return self.fn_ref.original_forward(*args, **kwargs)
        branch = 0 if self.state_manager.context.name == "cond" else 1
        prediction = None
        if branch == self.half:
            try:
                output = self.fn_ref.original_forward(*args, **kwargs)
                prediction = output[0] if isinstance(output, tuple) else output.sample
            except torch.OutOfMemoryError:  # raised below on every rank, once they agree (else the pair would wait)
                self.out_of_memory = True
        if prediction is None:
            prediction = self.empty_prediction(module, args, kwargs)
        self.predictions[branch] = prediction
        if branch == 1:
            # 1. Every rank says whether its half ran out of memory: all raise it, or none.
            failed = torch.tensor([int(self.out_of_memory)])
            torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX, group=self.flag_group)
            if failed.item():
                self.reset_state(module)
                raise torch.OutOfMemoryError("CFG-parallel: a rank ran out of GPU memory")
            # 2. The swap.
            mine, other = self.predictions[self.half], self.predictions[1 - self.half]
            if (mine.shape, mine.dtype) != (other.shape, other.dtype):  # a swap of unequal sizes would hang NCCL
                raise RuntimeError(f"CFG-parallel: the prediction is {tuple(mine.shape)} {mine.dtype}, the empty one "
                                   f"made for the pair's {tuple(other.shape)} {other.dtype}; run with one GPU")
            for src, tensor in enumerate(self.predictions):
                torch.distributed.broadcast(tensor, group_src=src, group=self.group)
            self.predictions = [None, None]
        if kwargs.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=prediction)
        return (prediction,)

    def reset_state(self, module):
        self.predictions, self.out_of_memory = [None, None], False
        return module


def enable_multi_gpu(pipe, state: ParallelState) -> tuple[CfgParallelHook | None, list[str]]:
    """Split the transformer's calls between the ranks (see the comment above); returns the CFG-parallel hook (None
    with an odd number of ranks) and what was applied."""
    applied = []
    transformer = pipe.transformer
    hook = None
    # 1. Context parallel inside each half: diffusers' Ulysses attention over the half's ranks.
    if state.cp_size > 1:
        from diffusers import ContextParallelConfig

        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=state.cp_size, ulysses_anything=True,
                                                                    mesh=state.mesh))
        applied.append(f"context_parallel(ulysses={state.cp_size})")

    # 2. CFG-parallel across the halves.
    if state.cfg_size == 2:
        group, half = (None, state.rank) if state.mesh is None else (state.mesh.get_group("cfg"), state.mesh.get_local_rank("cfg"))
        hook = CfgParallelHook(group, half, flag_group=state.job_group)
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(hook, "cfg_parallel")
        # NCCL builds a communicator at a group's first collective (seconds): here, not in the first image's steps.
        warm = torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu")
        torch.distributed.all_reduce(warm, group=group)
        applied.append("cfg_parallel(2 halves)")
    return hook, applied


def share_job(state: ParallelState | None, hook: CfgParallelHook | None, job: dict[str, Any]) -> None:
    """Called by `infer` with its checked job: rank 0 sends it to the other ranks; every rank arms CFG-parallel.

    Alone (`state` None), it does nothing.
    """
    if state is None:
        return
    if state.rank == 0:
        import torch.distributed as dist

        dist.broadcast_object_list([job], src=0, group=state.job_group)
    if hook is not None:  # the pipeline makes the uncond call only with true CFG (a negative prompt and scale > 1)
        hook.enabled = job["true_cfg_scale"] > 1 and job["negative_prompt"] is not None


def rank0_says(state: ParallelState | None, flag: bool) -> bool:
    """Rank 0's `flag` on every rank (one number over the CPU job group), so that all ranks act on it at the same
    point of a job; alone, `flag`."""
    if state is None:
        return flag
    value = torch.tensor([int(flag)])
    torch.distributed.broadcast(value, src=0, group=state.job_group)
    return bool(value.item())


def caption_from_rank0(state: ParallelState | None, write: Callable[[], str]) -> str:
    """The caption every rank conditions on: alone, `write()`. With several GPUs rank 0 writes it (`write` itself
    stops when the user asks) and sends it to the other ranks, which wait; a caption rank 0 did not finish (stopped,
    out of memory, an error) ends the job on every rank with `RunStopped`."""
    if state is None:
        return write()
    message = [None]
    if state.rank == 0:
        try:
            message = [write()]
        finally:  # sent also when `write` raised: [None] then
            torch.distributed.broadcast_object_list(message, src=0, group=state.job_group)
        return message[0]
    torch.distributed.broadcast_object_list(message, src=0, group=state.job_group)
    if message[0] is None:
        raise RunStopped("rank 0 did not finish the caption")
    return message[0]


def serve_rank(loaded, infer: Callable) -> None:
    """Ranks 1..N-1: run each job rank 0 sends (`infer(loaded, **job)`, the app's), until it sends None."""
    import torch.distributed as dist

    state = loaded.parallel
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0, group=state.job_group)
        if message[0] is None:
            return
        try:
            infer(loaded, **message[0])
        except (ValueError, OutOfMemoryError, RunStopped) as err:  # rank 0 reports the same failure to the user
            logger.error("Rank %d: %s", state.rank, err)


def stop_ranks(state: ParallelState | None) -> None:
    """Rank 0 at exit: the other ranks leave `serve_rank`, then everyone leaves the process group."""
    import torch.distributed as dist

    if state is None:
        return
    if state.rank == 0:
        dist.broadcast_object_list([None], src=0, group=state.job_group)
    dist.destroy_process_group()
