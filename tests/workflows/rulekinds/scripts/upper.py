text = open(snakemake.input[0]).read().upper()
with open(snakemake.output[0], "w") as out:
    out.write(text + f"word={snakemake.params.word} threads={snakemake.threads}\n")
with open(snakemake.log[0], "w") as log:
    log.write("upper done\n")
