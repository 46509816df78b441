"""galray: galaxy survey cutouts to embeddings, sparse features and image tokens, on Ray.

The file list is the pipeline (ARCHITECTURE.md; tests/test_layering.py holds the rules):

- ``config.py`` ``storage.py`` ``session.py`` ``tracking.py`` ``cli.py``: typed configs, URIs to
  filesystems, Ray start-up, MLflow, the command line built from the job configs;
- ``data/``: the data contracts and pure readers/writers: cutouts (decode, stretch, resize),
  preprocess (the image plan embed, encode and training share), shards (the cutout store),
  stores (embedding and code stores, the errors-first shard writer), resume, formats (survey
  readers), store (the only data module importing Ray), galsim_survey, xdf;
- ``models/``: pure PyTorch: sae, quantizer, vqvae, prior, sampling, backbones, inference, checkpoint;
- ``stages/``: one module per ``galray <verb>`` (job config + the function the CLI calls);
- ``train/``: Ray Train: config, launch (fit), datasets, workers, checkpoint, and one pure
  ``<kind>_loop.py`` per training kind with the face of ``train/loop.py``;
- ``analysis/``: arrays in, figures out.
"""

__version__ = "0.1.0"
