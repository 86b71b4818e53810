"""SOLVER.AMP.ENABLED on the CPU: a step runs the convolutions in bf16, keeps fp32 weights and
finite losses, and updates the weights; without the key (or on CUDA) detectron2's trainer stays."""

import itertools
import unittest
from unittest import mock

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from cbam_hrnet_d2.cpu.amp import CPUAMPTrainer, cpu_amp_trainer, trainer_class
from cbam_hrnet_d2.fixed_work import synthetic_batch

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
        base = SimpleTrainer(model, itertools.repeat(synthetic_batch(2, 128, 160, 2)), opt)
        trainer = cpu_amp_trainer(cfg, base)
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

    def test_without_the_key_or_off_the_cpu_the_trainer_is_kept(self):
        base = SimpleTrainer(torch.nn.Linear(1, 1), [], torch.optim.SGD([torch.zeros(1)], lr=0.1))
        for opts in ([], ["SOLVER.AMP.ENABLED", True, "MODEL.DEVICE", "cuda"]):
            with self.subTest(opts=opts):
                cfg = get_config(CONFIG, opts)
                cfg.MODEL.DEVICE = opts[-1] if opts else "cpu"
                self.assertIs(cpu_amp_trainer(cfg, base), base)

    def test_lazy_trainer_class_follows_train_amp_and_the_device(self):
        self.assertIs(trainer_class(False, "cpu"), SimpleTrainer)
        self.assertIs(trainer_class(True, "cpu"), CPUAMPTrainer)
        self.assertIs(trainer_class(True, "cuda"), AMPTrainer)
        self.assertIs(trainer_class(False, "cuda:0"), SimpleTrainer)

    def test_amp_on_a_cpu_that_emulates_bf16_warns_with_the_key(self):
        from cbam_hrnet_d2 import precision

        base = SimpleTrainer(torch.nn.Linear(1, 1), [], torch.optim.SGD([torch.zeros(1)], lr=0.1))
        cfg = get_config(CONFIG, ["SOLVER.AMP.ENABLED", True])
        with mock.patch.object(precision, "native_bf16", lambda device: False):
            with self.assertLogs("cbam_hrnet_d2.modeling.precision", "WARNING") as logs:
                self.assertIsInstance(cpu_amp_trainer(cfg, base), CPUAMPTrainer)
                self.assertIs(trainer_class(True, "cpu"), CPUAMPTrainer)
        self.assertIn("SOLVER.AMP.ENABLED = True", logs.output[0])
        self.assertIn("train.amp.enabled = True", logs.output[1])
