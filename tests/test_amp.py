"""SOLVER.AMP: on the CPU a step runs the convolutions in bf16, keeps fp32 weights and finite
losses, and updates the weights; on CUDA detectron2's AMPTrainer in SOLVER.AMP.PRECISION, which
also resumes a checkpoint written without AMP; without the key the trainer stays."""

import itertools
import unittest
from unittest import mock

import torch
from detectron2.engine import SimpleTrainer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from cbam_hrnet_d2.engine.amp import (
    CPUAMPTrainer,
    ResumableAMPTrainer,
    build_step_trainer,
    trainer_class,
)
from cbam_hrnet_d2.testing import synthetic_batch

from .common import get_config
from .test_training import CONFIG


class TestCPUAMP(unittest.TestCase):
    def test_a_step_runs_bf16_convs_with_fp32_weights_and_updates_them(self):
        torch.manual_seed(0)
        cfg = get_config(CONFIG, ["SOLVER.AMP.ENABLED", True])
        model = build_model(cfg).train()
        seen = []
        model.backbone.fpn_output2.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        trainer = build_step_trainer(
            cfg, model, itertools.repeat(synthetic_batch(2, 128, 160, 2)), opt
        )
        self.assertIsInstance(trainer, CPUAMPTrainer)
        self.assertIs(trainer.model, model)
        before = model.roi_heads.box_predictor.cls_score.weight.detach().clone()
        with EventStorage() as storage:
            trainer.iter = 0
            trainer.run_step()
            losses = {k: v.latest() for k, v in storage.histories().items() if "loss" in k}
        self.assertEqual(seen, [torch.bfloat16])
        self.assertTrue(losses and all(torch.isfinite(torch.tensor(v)) for v in losses.values()))
        self.assertTrue(all(p.dtype == torch.float32 for p in model.parameters()))
        after = model.roi_heads.box_predictor.cls_score.weight
        self.assertFalse(torch.equal(before, after))

    def test_without_the_key_the_trainer_is_detectron2s_simple_trainer(self):
        model = torch.nn.Linear(1, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        self.assertIs(type(build_step_trainer(get_config(CONFIG), model, [], opt)), SimpleTrainer)

    def test_trainer_class_follows_amp_the_device_and_the_precision(self):
        self.assertIs(trainer_class(False, "cpu"), SimpleTrainer)
        self.assertIs(trainer_class(True, "cpu"), CPUAMPTrainer)
        self.assertIs(trainer_class(True, "cpu", "bf16"), CPUAMPTrainer)
        self.assertIs(trainer_class(False, "cuda:0"), SimpleTrainer)
        model = torch.nn.Linear(1, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for precision, dtype, scaled in (
            ("auto", torch.float16, True),
            ("bf16", torch.bfloat16, False),
        ):
            with self.subTest(precision=precision):
                trainer = trainer_class(True, "cuda", precision)(model, [], opt)
                self.assertIsInstance(trainer, ResumableAMPTrainer)
                self.assertEqual(trainer.precision, dtype)
                # (torch disables a CUDA grad scaler itself where CUDA is absent)
                want = scaled and torch.cuda.is_available()
                self.assertEqual(trainer.grad_scaler.is_enabled(), want)

    def test_bad_amp_precision_names_the_key_and_the_fix(self):
        with self.assertRaisesRegex(ValueError, r"SOLVER.AMP.PRECISION = 'fp8'.*'auto', 'fp16'"):
            trainer_class(True, "cuda", "fp8")
        with self.assertRaisesRegex(ValueError, r"'fp16' needs CUDA.*SOLVER.AMP.PRECISION bf16"):
            trainer_class(True, "cpu", "fp16")

    def test_amp_trainer_resumes_a_checkpoint_written_without_amp(self):
        # detectron2's AMPTrainer raises KeyError 'grad_scaler' here
        model = torch.nn.Linear(1, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        plain = SimpleTrainer(model, [], opt)
        plain.iter = 7
        state = plain.state_dict()
        self.assertNotIn("grad_scaler", state)
        amp = trainer_class(True, "cuda", "fp16")(model, [], opt)
        with self.assertLogs("cbam_hrnet_d2.engine.amp", "WARNING") as logs:
            amp.load_state_dict(state)
        self.assertIn("grad scaler starts afresh", logs.output[0])
        with_scaler = amp.state_dict()
        self.assertIn("grad_scaler", with_scaler)
        amp.load_state_dict(with_scaler)  # and its own checkpoints as detectron2 does

    def test_fp16_and_bf16_amp_resume_each_others_checkpoints(self):
        # a disabled scaler (bf16) saves {}, which GradScaler.load_state_dict rejects
        model = torch.nn.Linear(1, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        bf16 = trainer_class(True, "cuda", "bf16")(model, [], opt)
        fp16 = trainer_class(True, "cuda", "fp16")(model, [], opt)
        bf16.iter = fp16.iter = 3
        from_bf16, from_fp16 = bf16.state_dict(), fp16.state_dict()
        self.assertEqual(from_bf16["grad_scaler"], {})
        with self.assertLogs("cbam_hrnet_d2.engine.amp", "WARNING") as logs:
            fp16.load_state_dict(from_bf16)
        self.assertIn("an empty one", logs.output[0])
        bf16.load_state_dict(from_fp16)  # a bf16 run has no scaler to load into
        self.assertEqual(bf16.state_dict()["grad_scaler"], {})

    def test_amp_on_a_cpu_that_emulates_bf16_warns_with_the_key(self):
        from cbam_hrnet_d2 import device

        model = torch.nn.Linear(1, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        cfg = get_config(CONFIG, ["SOLVER.AMP.ENABLED", True])
        with mock.patch.object(device, "native_bf16", lambda device: False):
            with self.assertLogs("cbam_hrnet_d2.device", "WARNING") as logs:
                self.assertIsInstance(build_step_trainer(cfg, model, [], opt), CPUAMPTrainer)
                self.assertIs(trainer_class(True, "cpu"), CPUAMPTrainer)
        self.assertEqual(len(logs.output), 2)
        self.assertIn("SOLVER.AMP.ENABLED", logs.output[0])
