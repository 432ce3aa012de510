"""The stages of a build, one module each, in the order :func:`builder.pipeline.build` calls them:

``fetch`` → ``media`` → ``install`` → ``provision`` → ``finalize`` → ``publish``

Each has ``run(ctx, …) -> result``: it takes the :class:`~builder.context.BuildContext` and what earlier stages
returned, and returns a typed result for the next ones. ``verify`` is a verb of its own (:mod:`builder.verify`).
"""
