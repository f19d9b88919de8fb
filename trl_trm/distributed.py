"""Clean shutdown of a multi-process (torch.distributed) run.

Why this exists: with the gloo backend, a process can deadlock at exit. Each collective's work object is destroyed
by gloo's worker thread, and destroying one that holds a Python tensor (e.g. the result of `accelerator.gather`)
needs the GIL. If the main thread drops the last reference to the process group at that moment (for example when
the DDP-wrapped model is freed as `main()` returns), the process group's destructor joins the worker thread while
holding the GIL: each waits for the other (seen in 2 of ~40 two-process runs here; native stacks show
`~ProcessGroupGloo` -> `std::thread::join` in the main thread and `~AsyncAllgatherWork` -> `gil_scoped_acquire` in
the gloo thread). :func:`shutdown_distributed` runs two barriers first: the main thread releases the GIL while it
waits in the second one, so the worker thread finishes freeing the earlier works; the second barrier's work holds no
Python tensor. Then the process group is destroyed.
"""

from __future__ import annotations

import gc


def shutdown_distributed() -> None:
    """Flush pending collectives and destroy the default process group (no-op when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()  # every rank is done; the gloo thread may still be freeing earlier works (needs the GIL)
    dist.barrier()  # waiting here releases the GIL, so it can; this barrier's own work holds no Python tensor
    gc.collect()
    dist.destroy_process_group()


def apply_timeout(seconds: float) -> None:
    """Set the collective timeout of the default process group to `seconds` (no-op when not distributed).

    Why this exists: transformers passes `ddp_timeout` to the process group it creates only when the run is not on
    CPU (`TrainingArguments._setup_devices` leaves it out under `use_cpu`), so a CPU (gloo) run waited 30 minutes
    for a stalled process whatever `ddp_timeout` said. The group exists by then (the config set it up), so its
    timeout is set in place; gloo then fails a collective that waits longer with "Timed out waiting ...ms".
    """
    from datetime import timedelta

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(timedelta(seconds=seconds))
