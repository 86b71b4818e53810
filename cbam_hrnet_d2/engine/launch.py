"""Starting the processes of a run: detectron2's ``launch`` with the device taken from the config
and stop signals forwarded to the workers.

* **Device.** detectron2's workers use NCCL and one GPU each whenever CUDA is present. With
  ``MODEL.DEVICE cpu`` (or a LazyConfig's ``train.device="cpu"``) on a CUDA host, :func:`launch`
  hides the GPUs from the workers it starts (``CUDA_VISIBLE_DEVICES=""`` in their environment), so
  they run as CPU processes over gloo, as on a machine without CUDA. With a CUDA device it checks
  ``--num-gpus`` against the visible GPUs before starting anything.
* **Schedulers.** Under SLURM's ``srun`` or ``torchrun`` (:mod:`.scheduler`) the scheduler has
  started every process already: :func:`launch_run` takes rank, world size and rendezvous from
  their environment and runs this process as its rank, spawning nothing; ``--num-gpus``,
  ``--num-machines``, ``--machine-rank`` and ``--dist-url`` are then not needed (and ignored, with
  a warning, where given).
* **Signals.** When it starts workers, a SIGTERM / SIGINT to the launching process is forwarded to
  them (they stop after the current step with a checkpoint, :mod:`.preemption`), and this process
  exits with their exit code (143 after SIGTERM).
"""

import contextlib
import logging
import multiprocessing
import os
import signal
from typing import Callable, List

import torch
from detectron2.engine import launch as d2_launch
from detectron2.utils.logger import setup_logger
from torch.multiprocessing import ProcessExitedException

from cbam_hrnet_d2.device import hide_gpus as must_hide_gpus
from cbam_hrnet_d2.device import is_cpu
from cbam_hrnet_d2.engine.lock import DEFAULT_LEASE_S, OutputDirBusy, claim_output_dir
from cbam_hrnet_d2.engine.preemption import STOP_SIGNALS
from cbam_hrnet_d2.engine.scheduler import ranks_from_environment, run_as_rank

__all__ = ["launch", "check_num_gpus", "launch_run"]

logger = logging.getLogger(__name__)


def check_num_gpus(num_gpus_per_machine: int, device: str) -> None:
    """ValueError naming ``--num-gpus`` when a CUDA run asks for more GPUs than are visible."""
    if is_cpu(device):
        return
    visible = torch.cuda.device_count()
    if num_gpus_per_machine > visible:
        raise ValueError(
            f"--num-gpus {num_gpus_per_machine} with MODEL.DEVICE {device!r}, but this machine "
            f"has {visible} visible GPU(s) (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}). Use --num-gpus {visible} or "
            "fewer, or MODEL.DEVICE cpu for that many CPU processes."
        )


def launch(
    main_func,
    num_gpus_per_machine: int,
    *,
    num_machines: int = 1,
    device: str = "cuda",
    **kwargs,
) -> None:
    """detectron2's ``launch`` (same arguments) for a run on ``device``; see the module doc."""
    if num_gpus_per_machine * num_machines <= 1:
        return d2_launch(main_func, num_gpus_per_machine, num_machines=num_machines, **kwargs)
    check_num_gpus(num_gpus_per_machine, device)
    # this process only launches: its own lines (the one below) need a console handler, which
    # the workers set up for themselves in main()
    setup_logger(name="cbam_hrnet_d2")
    forwarded = []

    def forward(signum, _frame):
        forwarded.append(signum)
        for child in multiprocessing.active_children():
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:
                pass

    hide_gpus = must_hide_gpus(device)
    saved_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hide_gpus:
        logger.info(
            "MODEL.DEVICE cpu on a CUDA host: %d CPU processes (gloo)", num_gpus_per_machine
        )
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # inherited by the spawned workers only
    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        d2_launch(main_func, num_gpus_per_machine, num_machines=num_machines, **kwargs)
    except ProcessExitedException as e:
        if forwarded or e.exit_code in tuple(128 + int(s) for s in STOP_SIGNALS):
            raise SystemExit(e.exit_code) from None
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if hide_gpus:
            if saved_visible is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved_visible


def launch_run(
    main_func,
    args,
    *,
    device: str,
    output_dir: str,
    output_dir_opts: Callable[[str], List[str]],
    lock_lease_s: float = DEFAULT_LEASE_S,
) -> None:
    """What ``train_net.py`` and ``lazy_train_net.py`` do with the parsed ``args`` of detectron2's
    argument parser: hold ``output_dir`` for the run (machine 0 only; :mod:`.lock`), send an
    ``--eval-only`` run into its own folder when a training run holds it
    (``output_dir_opts(folder)`` gives the overrides that say so), then :func:`launch`
    ``main_func(args)`` on ``device`` -- or, where SLURM or torchrun started this process as one
    rank of a run, run it as that rank (:mod:`.scheduler`)."""
    ranks = ranks_from_environment()
    if ranks is not None:
        given = (
            ("--num-gpus", args.num_gpus, args.num_gpus > 1),
            ("--num-machines", args.num_machines, args.num_machines > 1),
            ("--machine-rank", args.machine_rank, args.machine_rank != 0),
        )
        ignored = [f"{flag} {value}" for flag, value, set_by_user in given if set_by_user]
        if ignored:
            logger.warning(
                "%s started this process as rank %d of %d: %s ignored (the scheduler's layout "
                "is used)",
                ranks.source,
                ranks.rank,
                ranks.world_size,
                ", ".join(ignored),
            )
    first = ranks.rank == 0 if ranks is not None else args.machine_rank == 0
    claim = (
        claim_output_dir(output_dir, eval_only=args.eval_only, lease_s=lock_lease_s)
        if first
        else contextlib.nullcontext(output_dir)
    )
    with contextlib.ExitStack() as stack:
        try:
            folder = stack.enter_context(claim)
        except OutputDirBusy as e:  # one line, no traceback: nothing has started
            raise SystemExit(f"error: {e}") from None
        if folder != output_dir:
            args.opts = [*args.opts, *output_dir_opts(folder)]
        if ranks is not None:
            run_as_rank(main_func, ranks, device, args=(args,))
            return
        launch(
            main_func,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            device=device,
            args=(args,),
        )
