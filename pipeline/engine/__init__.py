"""The engine: a diffusers model sampled, recorded and edited in h-space (:class:`~pipeline.engine.model.HSpaceModel`),
its families, schedule, noise streams, hooks and loading."""
