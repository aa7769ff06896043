"""Building blocks shared by the models (MaxText-style split: layers/ here, assemblies in models/)."""
