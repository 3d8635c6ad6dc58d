cat "${snakemake_input[0]}" > "${snakemake_output[0]}"
echo "tag=${snakemake_params[tag]}" >> "${snakemake_output[0]}"
