"""CBAM_HRNET.EMA (cbam_hrnet_d2/engine/ema.py): the average follows its formula, evaluations run it
and put the raw weights back, the final model holds it, and a resumed run continues it exactly."""

import itertools
import os
import tempfile
import unittest

import torch
from detectron2.engine import SimpleTrainer, hooks
from torch import nn

from cbam_hrnet_d2.checkpoint import SafeCheckpointer
from cbam_hrnet_d2.engine.ema import ModelEMA

from .common import SHAPES_CONFIG, get_config


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # an integer buffer

    def forward(self, x):
        self.steps += 1
        return {"loss": ((self.lin(x) - 1.0) ** 2).mean()}


DATA = [torch.randn(3, 4, generator=torch.Generator().manual_seed(0))]


def make(out=None, decay=0.8, evals=None, period=1):
    """(model, trainer, ema hook) of a fresh run; checkpoints every 3 steps into ``out``."""
    torch.manual_seed(0)
    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # one batch: a resumed run sees the same data (ExactResume replays real streams)
    trainer = SimpleTrainer(model, itertools.repeat(DATA[0]), opt)
    ema = ModelEMA(decay, period)
    listed = [ema]
    if out:
        os.makedirs(out, exist_ok=True)
        trainer.checkpointer = SafeCheckpointer(model, out, trainer=trainer)
        listed.append(hooks.PeriodicCheckpointer(trainer.checkpointer, 3))
    if evals is not None:
        listed.append(hooks.EvalHook(2, ema.evaluating(lambda: evals.append(weights(model)))))
    trainer.register_hooks(listed)
    return model, trainer, ema


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class TestModelEMA(unittest.TestCase):
    def test_the_average_follows_its_formula_and_the_final_model_holds_it(self):
        model, trainer, ema = make()
        start = weights(model)
        raw = []
        trainer.register_hooks([_Record(raw, ema)])
        trainer.train(0, 5)
        expected = {k: start[k] for k in ("lin.weight", "lin.bias")}
        for n, w in enumerate(raw, start=1):
            d = min(0.8, (1 + n) / (10 + n))
            expected = {k: d * v + (1 - d) * w[k] for k, v in expected.items()}
        final = model.state_dict()
        for k, v in expected.items():
            torch.testing.assert_close(final[k], v)
            self.assertFalse(torch.equal(final[k], raw[-1][k]))  # not the raw weights
            torch.testing.assert_close(ema.raw[k], raw[-1][k])  # which the hook keeps
        self.assertEqual(int(final["steps"]), 5)  # integer buffers are the model's own

    def test_a_period_moves_the_average_every_k_steps_and_after_the_last(self):
        model, trainer, ema = make(period=3)
        start = weights(model)
        raw = []
        trainer.register_hooks([_Record(raw, ema)])
        trainer.train(0, 5)  # moves after steps 3 and 5 (the last), by d**3 and d**2
        expected = {k: start[k] for k in ("lin.weight", "lin.bias")}
        for n, k in ((3, 3), (5, 2)):
            d = min(0.8, (1 + n) / (10 + n)) ** k
            expected = {name: d * v + (1 - d) * raw[n - 1][name] for name, v in expected.items()}
        for name, v in expected.items():
            torch.testing.assert_close(model.state_dict()[name], v)
        with self.assertRaisesRegex(
            ValueError, r"CBAM_HRNET.EMA.PERIOD = 0 must be an integer >= 1"
        ):
            ModelEMA(0.9, 0)

    def test_evaluations_run_the_average_and_put_the_raw_weights_back(self):
        seen = []
        model, trainer, ema = make(evals=seen)
        trainer.train(0, 4)
        self.assertEqual(len(seen), 2)  # after steps 2 and 4
        # the first evaluation saw the average, and training went on from the raw weights
        self.assertFalse(torch.equal(seen[0]["lin.weight"], model.lin.weight))
        torch.testing.assert_close(seen[1]["lin.weight"], model.lin.weight)  # the last: the average

    def test_a_resumed_run_continues_the_average_exactly(self):
        with tempfile.TemporaryDirectory() as d:
            # a period of 2 across the checkpoint after step 3: one step pending when it is written
            whole, trainer, _ = make(os.path.join(d, "whole"), period=2)
            trainer.train(0, 6)
            part, trainer, _ = make(os.path.join(d, "part"), period=2)
            trainer.register_hooks([_StopAfter(2)])  # killed after the checkpoint of step 3
            with self.assertRaises(_Stopped):
                trainer.train(0, 6)
            resumed, trainer, ema = make(os.path.join(d, "part"), period=2)
            trainer.checkpointer.resume_or_load("", resume=True)
            self.assertEqual(ema.updates, 3)
            trainer.train(trainer.iter + 1, 6)
        for k, v in whole.state_dict().items():
            torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0, msg=k)

    def test_the_keys_have_defaults_and_a_bad_decay_is_named(self):
        cfg = get_config(SHAPES_CONFIG)
        self.assertFalse(cfg.CBAM_HRNET.EMA.ENABLED)
        with self.assertRaisesRegex(ValueError, r"CBAM_HRNET.EMA.DECAY = 1.5 must lie in \(0, 1\)"):
            ModelEMA(1.5)


class _Stopped(Exception):
    pass


class _StopAfter(hooks.HookBase):
    """Stops the run after iteration ``it`` (its checkpoint written), as a kill would."""

    def __init__(self, it):
        self.it = it

    def after_step(self):
        if self.trainer.iter == self.it:
            raise _Stopped()


class _Record(hooks.HookBase):
    """Records the raw weights after each step (registered after the ModelEMA ``ema``)."""

    def __init__(self, out, ema):
        self.out, self.ema = out, ema

    def after_step(self):
        self.out.append(self.ema.raw if self.ema.raw is not None else weights(self.trainer.model))
