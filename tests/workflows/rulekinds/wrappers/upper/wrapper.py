from snakemake.shell import shell

shell("tr a-z A-Z < {snakemake.input[0]} > {snakemake.output[0]}")
