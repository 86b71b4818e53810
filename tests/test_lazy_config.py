"""Detectron2's LazyConfig front door: the lazy configs build the same networks as the
YAML ones, checkpoints load across, lazy_train_net.py trains and evaluates, the demo takes them, bad
overrides are named."""

import json
import os
import subprocess
import sys
import tempfile
import unittest

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model
from detectron2.solver import LRMultiplier, build_lr_scheduler

from cbam_hrnet_d2.checkpoint.checkpointer import SafeCheckpointer
from cbam_hrnet_d2.data import generate_shapes
from cbam_hrnet_d2.engine.optimizer import build_optimizer

from .common import CONFIGS, REPO, get_config
from .test_real_world_data import truncate

LAZY = os.path.join(CONFIGS, "lazy")
W18_LAZY = os.path.join(LAZY, "mask_rcnn_cbam_hrnet_w18_fpn.py")
SHAPES_LAZY = os.path.join(LAZY, "mask_rcnn_cbam_hrnet_w18_fpn_shapes.py")
PAIRS = (
    (W18_LAZY, os.path.join(CONFIGS, "mask_rcnn_CBAM_HRNet_W18_FPN_1x.yaml")),
    (SHAPES_LAZY, os.path.join(CONFIGS, "shapes", "mask_rcnn_CBAM_HRNet_W18_FPN_shapes.yaml")),
)


def lazy_model(path, overrides=()):
    """The model lazy_train_net.py builds on a machine without CUDA (``train.device`` "cpu")."""
    cfg = LazyConfig.apply_overrides(LazyConfig.load(path), list(overrides))
    cfg.train.device = "cpu"
    return instantiate(cfg.model).eval()


def yaml_model(path):
    return build_model(get_config(path, ["MODEL.WEIGHTS", ""])).eval()


class TestLazyConfigs(unittest.TestCase):
    def test_both_lazy_configs_load_and_instantiate_their_parts(self):
        for path, _ in PAIRS:
            with self.subTest(config=os.path.basename(path)):
                cfg = LazyConfig.load(path)
                self.assertEqual(
                    set(cfg), {"model", "dataloader", "optimizer", "lr_multiplier", "train"}
                )
                model = instantiate(cfg.model)
                self.assertEqual(type(model.backbone.bottom_up).__name__, "CBAMHRNet")
                # detectron2's GeneralizedRCNN with our registered heads, as the YAML configs
                self.assertEqual(type(model).__name__, "GeneralizedRCNN")
                self.assertEqual(type(model.roi_heads).__name__, "CPUFastROIHeads")
                want = 12 if "shapes" in path else 0
                self.assertEqual(model.roi_heads.mask_positives_per_image, want)

    def test_both_load_and_build_where_pkg_resources_is_absent(self):
        # setuptools 81+ ships no pkg_resources, which detectron2's model_zoo.get_config needs
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "pkg_resources.py"), "w") as f:
                f.write("raise ModuleNotFoundError(\"No module named 'pkg_resources'\")\n")
            code = (
                "import sys\n"
                "from detectron2.config import LazyConfig, instantiate\n"
                "for path in sys.argv[1:]:\n"
                "    cfg = LazyConfig.load(path)\n"
                "    cfg.train.device = 'cpu'\n"
                "    mapper = cfg.dataloader.train.mapper._target_\n"
                "    print(type(instantiate(cfg.model)).__name__, mapper)\n"
                "import pkg_resources\n"
            )
            env = dict(os.environ, PYTHONPATH=d, PYTHONWARNINGS="ignore")
            proc = subprocess.run(
                [sys.executable, "-c", code, *(p for p, _ in PAIRS)],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
        lines = proc.stdout.splitlines()
        self.assertEqual(len(lines), 2, proc.stdout + proc.stderr[-3000:])
        for line in lines:
            self.assertIn("GeneralizedRCNN", line)
            self.assertIn("RobustDatasetMapper", line)
        self.assertIn("No module named 'pkg_resources'", proc.stderr)  # it really was absent

    def test_the_coco_config_trains_through_the_robust_mapper_into_the_output_dir(self):
        cfg = LazyConfig.load(W18_LAZY)
        cfg.train.output_dir = "/tmp/run"
        cfg.dataloader.train.dataset.names = "my_train"
        mapper = instantiate(cfg.dataloader.train.mapper)
        self.assertEqual(type(mapper).__name__, "RobustDatasetMapper")
        self.assertTrue(mapper.skip_bad_images)
        self.assertEqual(mapper.bad_images_file, "/tmp/run/bad_images.tsv")
        self.assertEqual(mapper.dataset_names, ["my_train"])
        test_mapper = instantiate(cfg.dataloader.test.mapper)
        self.assertEqual(type(test_mapper).__name__, "RobustDatasetMapper")
        self.assertFalse(test_mapper.skip_bad_images)  # evaluation stops on a bad image

    def test_lazy_and_yaml_models_have_equal_parameters_and_state_dict_keys(self):
        for lazy_path, yaml_path in PAIRS:
            with self.subTest(config=os.path.basename(lazy_path)):
                a, b = lazy_model(lazy_path), yaml_model(yaml_path)
                count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
                self.assertEqual(count(a), count(b))
                sa, sb = a.state_dict(), b.state_dict()
                self.assertEqual(sorted(sa), sorted(sb))
                self.assertEqual(
                    {k: tuple(v.shape) for k, v in sa.items()},
                    {k: tuple(v.shape) for k, v in sb.items()},
                )
                trainable = lambda m: [n for n, p in m.named_parameters() if p.requires_grad]  # noqa: E731
                self.assertEqual(trainable(a), trainable(b))  # same frozen stages

    def test_a_checkpoint_of_one_loads_into_the_other_with_equal_outputs(self):
        lazy_path, yaml_path = PAIRS[1]
        torch.manual_seed(0)
        a, b = lazy_model(lazy_path), yaml_model(yaml_path)
        with tempfile.TemporaryDirectory() as d:
            SafeCheckpointer(a, save_dir=d).save("lazy")
            loaded = SafeCheckpointer(b).load(os.path.join(d, "lazy.pth"))
        self.assertEqual(loaded, {})  # nothing left over (the model's tensors were consumed)
        self.assertTrue(all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items()))
        for m in (a, b):
            m.roi_heads.box_predictor.test_score_thresh = 0.0  # random init: keep detections
        image = torch.rand(3, 128, 160) * 255
        with torch.no_grad():
            out_a = a([{"image": image}])[0]["instances"]
            out_b = b([{"image": image}])[0]["instances"]
        self.assertGreater(len(out_a), 0)
        self.assertTrue(torch.equal(out_a.pred_boxes.tensor, out_b.pred_boxes.tensor))
        self.assertTrue(torch.equal(out_a.scores, out_b.scores))
        self.assertTrue(torch.equal(out_a.pred_masks, out_b.pred_masks))

    def test_shapes_recipe_optimizer_and_schedule_equal_the_yaml_ones(self):
        cfg = LazyConfig.load(SHAPES_LAZY)
        ycfg = get_config(PAIRS[1][1])
        self.assertEqual(
            (cfg.train.max_iter, cfg.dataloader.train.total_batch_size, cfg.train.seed),
            (ycfg.SOLVER.MAX_ITER, ycfg.SOLVER.IMS_PER_BATCH, ycfg.SEED),
        )
        model = lazy_model(SHAPES_LAZY)
        cfg.optimizer.params.model = model
        lazy_opt = instantiate(cfg.optimizer)
        yaml_opt = build_optimizer(ycfg, model)
        self.assertEqual(type(lazy_opt), type(yaml_opt))
        strip = [{k: v for k, v in g.items() if k != "params"} for g in lazy_opt.param_groups]
        self.assertEqual(
            strip, [{k: v for k, v in g.items() if k != "params"} for g in yaml_opt.param_groups]
        )
        # the LR of every iteration: detectron2's LRMultiplier over each side's multiplier
        lazy_sched = LRMultiplier(lazy_opt, instantiate(cfg.lr_multiplier), cfg.train.max_iter)
        yaml_sched = build_lr_scheduler(ycfg, yaml_opt)
        for _ in range(cfg.train.max_iter):
            self.assertAlmostEqual(lazy_sched.get_last_lr()[0], yaml_sched.get_last_lr()[0], 12)
            lazy_sched.step()
            yaml_sched.step()
        self.assertAlmostEqual(yaml_sched.get_last_lr()[0], 0.0003, 12)  # after the step at 980

    def test_bad_width_override_names_the_value_and_the_allowed_ones(self):
        with self.assertRaisesRegex(
            ValueError, r"width \(MODEL.CBAM_HRNET.WIDTH\) = 19 .*allowed values: \[18, 32, 48\]"
        ):
            lazy_model(W18_LAZY, ["model.backbone.bottom_up.width=19"])


@pytest.mark.slow
class TestLazyTrainNet(unittest.TestCase):
    def test_trains_two_iterations_on_shapes_with_cpu_amp_and_prints_bbox_and_segm_ap(self):
        with tempfile.TemporaryDirectory() as d:
            # tiny sets in the place of shapes_train / shapes_val ($DETECTRON2_DATASETS/shapes),
            # one training image truncated: skipped, named and counted as train_net.py does
            generate_shapes(os.path.join(d, "shapes"), "train", 4, seed=11)
            generate_shapes(os.path.join(d, "shapes"), "val", 2, seed=12)
            bad = os.path.join(d, "shapes", "train", "000001.png")
            truncate(bad)
            out = os.path.join(d, "out")
            env = dict(os.environ, DETECTRON2_DATASETS=d, PYTHONWARNINGS="ignore")
            cmd = [
                sys.executable, os.path.join(REPO, "lazy_train_net.py"),
                "--config-file", SHAPES_LAZY, "train.max_iter=2", "train.checkpointer.period=1",
                f"train.output_dir={out}",
                "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0",
                "dataloader.test.num_workers=0", "train.amp.enabled=True",
            ]  # fmt: skip
            proc = subprocess.run(
                cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600
            )
            log = proc.stdout + proc.stderr
            self.assertEqual(proc.returncode, 0, log[-4000:])
            self.assertIn("Trainer: CPUAMPTrainer", log)  # train.amp on the CPU: bf16 autocast
            self.assertIn("Evaluation results for bbox", log)
            self.assertIn("Evaluation results for segm", log)
            with open(os.path.join(out, "results.json")) as f:
                self.assertEqual(set(json.load(f)["shapes_val"]), {"bbox", "segm"})
            self.assertTrue(os.path.isfile(os.path.join(out, "model_final.pth")))
            # the shared hooks: the bad image named and counted, RSS logged, the lock released
            with open(os.path.join(out, "bad_images.tsv")) as f:
                self.assertEqual({line.split("\t")[1] for line in f}, {bad})
            with open(os.path.join(out, "metrics.json")) as f:
                metrics = [json.loads(line) for line in f if line.strip()]
            self.assertEqual([m["data/bad_images"] for m in metrics if "data/bad_images" in m], [1])
            self.assertIn("RSS after the first iteration", log)
            self.assertIn("1 image(s) were skipped as unusable", log)
            self.assertFalse(os.path.exists(os.path.join(out, "run.lock")))

            # the demo takes the .py config too, with key=value overrides
            pictures = os.path.join(d, "pictures")
            os.makedirs(pictures)
            demo = [
                sys.executable, os.path.join(REPO, "demo", "demo.py"), "--config-file", SHAPES_LAZY,
                "--input", os.path.join(d, "shapes", "val", "000000.png"), "--output", pictures,
                "--attention", "--confidence-threshold", "0.0",
                "--opts", f"train.init_checkpoint={out}/model_final.pth",
            ]  # fmt: skip
            proc = subprocess.run(
                demo, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
            )
            self.assertEqual(proc.returncode, 0, (proc.stdout + proc.stderr)[-4000:])
            written = sorted(os.listdir(pictures))
            self.assertIn("000000.png", written)
            self.assertTrue(any("attention" in f for f in written), written)
