"""Curation (``evaclip data score | filter``): curate image-text shards with a CLIP model (LAION / DataComp style).

score   streams shards through a model and writes one parquet table per input shard: key, shard, source,
        CLIP score (cosine of the normalised embeddings), image bytes / width / height, caption and its
        length, optionally the image embedding. A table is written atomically when its shard is done, so a
        killed run restarted with the same command skips the finished shards. ``--part i/n`` (and torchrun's
        RANK / WORLD_SIZE) split the shards between processes; no process talks to another.
filter  keeps samples by a threshold, a top / bottom fraction per source (DataComp) or an expression over
        the table's columns, and copies the kept samples' files, byte for byte, into new webdataset shards
        (img2dataset layout, the score added to each sample's .json) with a manifest and a recipe that points
        at them. The input shards are never modified. Tables of per-sample training losses
        (``log.sample_loss``) are valid input too.

Modules: ``score`` (tables of scores per shard), ``where`` (the expression language of ``--where``), ``filter``
(selection, cuts per source, the copy into new shards), ``histogram`` (its plot).
"""
