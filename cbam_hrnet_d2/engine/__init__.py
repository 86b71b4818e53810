"""Training and evaluation around detectron2's engine: the trainer (:mod:`.trainer`), launching
processes (:mod:`.launch`), one run per output folder (:mod:`.lock`), preemption checkpoints
(:mod:`.preemption`), exact resume (:mod:`.resume`), mixed precision (:mod:`.amp`), the optimizer
choice (:mod:`.optimizer`), metrics hooks (:mod:`.hooks`) and result files (:mod:`.results`)."""

from cbam_hrnet_d2.engine.launch import launch, launch_run
from cbam_hrnet_d2.engine.lock import OutputDirBusy, claim_output_dir
from cbam_hrnet_d2.engine.trainer import Trainer

__all__ = ["Trainer", "launch", "launch_run", "claim_output_dir", "OutputDirBusy"]
