"""The low-VRAM engine (offload mode "budget"): `plan` is pure arithmetic over sizes, `memory` measures the
weights and the machine, `stream` moves the weights (host copies, page-locking, diffusers' group-offloading hooks)."""
