"""Training with Ray Train: ``launch.fit(job)`` on the driver, ``workers.train_loop_per_worker`` on each
rank, one pure ``<kind>_loop.py`` per kind (the face of ``loop.py``), registered in ``config.KINDS``."""
