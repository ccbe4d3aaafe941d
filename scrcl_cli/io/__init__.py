"""File input and output: `.h5ad` reading and patched writing (`h5ad`), guarded atomic outputs (`output`)."""
