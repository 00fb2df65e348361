"""Patch arithmetic shared by the front end, the losses and the data checks (SPEC §3.1)."""


def n_patches(n_time_steps, patch_size: int, patch_stride: int):
  """Number of patches `floor((T - size) / stride) + 1` (works on ints and arrays; <= 0 means too short)."""
  return (n_time_steps - patch_size) // patch_stride + 1
