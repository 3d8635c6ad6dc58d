"""Content-addressed staging of local files to object storage and back.

Used by the TES backend only; knows nothing of Snakemake or TES. ``digest`` hashes files (with a
cache), ``store`` talks to S3 / GCS / Azure / file:// through obstore, ``stage`` puts the two
together: inputs go to ``<prefix>/cas/sha256/<hex>``, outputs come back atomically, each put at
its path by ``install``.
"""
