"""Data contracts and the code that reads and writes them (pyarrow + numpy; only ``store.py`` imports Ray).

cutouts (one cutout: decode, check, stretch, crop, resize) -> preprocess (the image plan shared by
embed, encode and training) -> shards (the cutout store's files and metadata) and stores (the
embedding and code stores, footer row counts, the errors-first shard writer) -> resume (which
shards a rerun still has to do). formats reads surveys as they ship; galsim_survey and xdf make
stores of simulated and real galaxies; store is the cutout store seen from Ray (and `galray info`).
"""
