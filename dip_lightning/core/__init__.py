"""The core layer: the DiP network, the diffusion objective and samplers, data, metrics, REPA, post-hoc EMA math,
and the kit's conventions (atomic writes, ranks, image ranges, seeds, library internals). Imports nothing else of
the kit (docs/design.md)."""
