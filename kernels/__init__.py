"""Triton kernels with pure-torch references; one dispatch rule for all (see ``_dispatch``)."""

from ._dispatch import HAVE_TRITON, force_reference, interpreting, reference_forced, unusable_kernels, use_triton
from .blend import blend_tiles, ramp_window
from .frames import frames_to_input, output_to_frames
from .group_norm import group_norm, group_norm_apply, group_norm_stats, merge_group_stats
from .rms_norm import rms_norm
from .tile_change import tile_change
from .upconv import fold_weight, upsample_conv3x3

__all__ = [
    "HAVE_TRITON",
    "blend_tiles",
    "force_reference",
    "frames_to_input",
    "group_norm",
    "group_norm_apply",
    "group_norm_stats",
    "interpreting",
    "merge_group_stats",
    "output_to_frames",
    "ramp_window",
    "rms_norm",
    "reference_forced",
    "tile_change",
    "unusable_kernels",
    "use_triton",
    "fold_weight",
    "upsample_conv3x3",
]
