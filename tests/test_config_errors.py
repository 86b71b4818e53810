"""Bad config values raise errors naming the key, the value and the allowed values."""

import os
import tempfile
import unittest

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from .common import DEFAULT_CONFIG, get_config


def _build(opts):
    return build_backbone(get_config(opts=opts), ShapeSpec(channels=3))


class TestBadValues(unittest.TestCase):
    cases = [
        (["MODEL.CBAM_HRNET.WIDTH", 24], "MODEL.CBAM_HRNET.WIDTH", "24", "18, 32, 48"),
        (
            ["MODEL.CBAM_HRNET.NORM", "LN"],
            "MODEL.CBAM_HRNET.NORM",
            "'LN'",
            "'BN', 'SyncBN', 'FrozenBN', 'GN'",
        ),
        (["MODEL.CBAM.POSITION", "neck"], "MODEL.CBAM.POSITION", "'neck'", "'branches', 'fpn'"),
        (["MODEL.CBAM.REDUCTION", 0], "MODEL.CBAM.REDUCTION", "0", ">= 1"),
        (["MODEL.CBAM.KERNEL_SIZE", 4], "MODEL.CBAM.KERNEL_SIZE", "4", "odd positive"),
        (["MODEL.CBAM.KERNEL_SIZE", -3], "MODEL.CBAM.KERNEL_SIZE", "-3", "odd positive"),
        (["MODEL.CBAM.BRANCHES", ["hr2", "hr6"]], "MODEL.CBAM.BRANCHES", "'hr6'", "'hr2', 'hr3'"),
        (["MODEL.BACKBONE.FREEZE_AT", 6], "MODEL.BACKBONE.FREEZE_AT", "6", "0, 1, 2, 3, 4, 5"),
    ]

    def test_each_bad_value_names_key_value_and_allowed_values(self):
        for opts, key, value, allowed in self.cases:
            with self.subTest(key=key, value=value):
                with self.assertRaises(ValueError) as ctx:
                    _build(opts)
                msg = str(ctx.exception)
                self.assertIn(key, msg)
                self.assertIn(value, msg)
                self.assertIn(allowed, msg)

    def test_position_fpn_on_bare_trunk_is_refused(self):
        with self.assertRaisesRegex(ValueError, "build_cbam_hrnet_fpn_backbone"):
            _build(
                ["MODEL.BACKBONE.NAME", "build_cbam_hrnet_backbone", "MODEL.CBAM.POSITION", "fpn"]
            )

    def test_unknown_yaml_key_fails_naming_it(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "typo.yaml")
            with open(path, "w") as f:
                f.write(f'_BASE_: "{DEFAULT_CONFIG}"\nMODEL:\n  CBAM:\n    REDUCTON: 8\n')
            with self.assertRaisesRegex(KeyError, "MODEL.CBAM.REDUCTON"):
                get_config(path)

    def test_unknown_command_line_key_fails_naming_it(self):
        # yacs reports command-line typos with an AssertionError
        with self.assertRaisesRegex(AssertionError, "MODEL.CBAM_HRNET.WIDHT"):
            get_config(opts=["MODEL.CBAM_HRNET.WIDHT", 32])


class TestBadTrainingValues(unittest.TestCase):
    def test_unknown_optimizer_names_key_value_and_allowed_values(self):
        from detectron2.modeling import build_model

        from cbam_hrnet_d2.engine.optimizer import build_optimizer

        cfg = get_config(opts=["SOLVER.OPTIMIZER", "Lion"])
        with self.assertRaisesRegex(ValueError, r"SOLVER.OPTIMIZER = 'Lion'.*\['SGD', 'AdamW'\]"):
            build_optimizer(cfg, build_model(cfg))

    def test_register_coco_entry_of_wrong_length_names_the_entry(self):
        from cbam_hrnet_d2.data import register_from_cfg

        cfg = get_config(opts=["DATASETS.REGISTER_COCO", "[['only_a_name', 'a.json']]"])
        with self.assertRaisesRegex(
            ValueError, r"DATASETS.REGISTER_COCO\[0\].*\[name, json_file, image_root\]"
        ):
            register_from_cfg(cfg)

    def test_reregistering_a_name_with_other_files_is_refused(self):
        from cbam_hrnet_d2.data import register_coco_json

        register_coco_json("twice_test", "/x/a.json", "/x/img")
        register_coco_json("twice_test", "/x/a.json", "/x/img")  # same files: fine
        with self.assertRaisesRegex(
            ValueError, r"'twice_test' is already registered with other files"
        ):
            register_coco_json("twice_test", "/y/b.json", "/y/img")


class TestDetectron2Configs(unittest.TestCase):
    def test_a_shipped_config_is_found_without_pkg_resources_and_a_missing_one_is_named(self):
        from cbam_hrnet_d2.config import detectron2_config, detectron2_config_file

        self.assertTrue(os.path.isfile(detectron2_config_file("common/models/mask_rcnn_fpn.py")))
        self.assertIn("model", detectron2_config("common/models/mask_rcnn_fpn.py"))
        with self.assertRaisesRegex(FileNotFoundError, r"'common/nowhere\.py' is not one of"):
            detectron2_config_file("common/nowhere.py")
