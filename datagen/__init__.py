"""Synthetic data for demos, tests and benches (not a stage): ``datagen.generate`` writes a seeded
buy-till-you-die order export, or one export per source with an identity map, that goes through
ingest like a client's file. It depends on ``core`` only; no stage imports it."""
