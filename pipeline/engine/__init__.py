"""The engine: a diffusers model sampled, recorded and edited in h-space (:class:`~pipeline.engine.model.HSpaceModel`),
with its edits, inversion, model families (:mod:`.families`), schedules (:mod:`.schedules`: DDIM, flow
matching), hooks, noise streams and loading (docs/design.md, "Inside the engine")."""
