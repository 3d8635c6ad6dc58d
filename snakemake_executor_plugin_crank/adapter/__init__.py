"""The only code that reads Snakemake's job objects: job -> tasks, resources, outputs."""
