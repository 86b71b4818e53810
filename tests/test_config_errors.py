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
        (["MODEL.HRNET.WIDTH", 24], "MODEL.HRNET.WIDTH", "24", "18, 32, 48"),
        (["MODEL.HRNET.NORM", "LN"], "MODEL.HRNET.NORM", "'LN'", "'BN', 'SyncBN', 'FrozenBN', 'GN'"),
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
            _build(["MODEL.BACKBONE.NAME", "build_cbam_hrnet_backbone", "MODEL.CBAM.POSITION", "fpn"])

    def test_unknown_yaml_key_fails_naming_it(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "typo.yaml")
            with open(path, "w") as f:
                f.write(f'_BASE_: "{DEFAULT_CONFIG}"\nMODEL:\n  CBAM:\n    REDUCTON: 8\n')
            with self.assertRaisesRegex(KeyError, "MODEL.CBAM.REDUCTON"):
                get_config(path)

    def test_unknown_command_line_key_fails_naming_it(self):
        # yacs reports command-line typos with an AssertionError
        with self.assertRaisesRegex(AssertionError, "MODEL.HRNET.WIDHT"):
            get_config(opts=["MODEL.HRNET.WIDHT", 32])
