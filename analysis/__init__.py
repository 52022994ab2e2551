"""The paper's figures and tables made from our runs (matplotlib, PNG + PDF).

==============================  ==============  ===========================================
command                         paper           reads
==============================  ==============  ===========================================
``analysis/params.py``          Fig. 5, S1      the ablation results store (JSONL)
``analysis/token_indices.py``   Fig. 6          the lab model with ``ustc.attach`` (layer K)
``analysis/token_maps.py``      Fig. S3         lab videos + ``Compressor.compress`` outputs
``analysis/attention_similarity.py``  Fig. 4    lab videos + ``Compressor.compress`` outputs
``analysis/efficiency.py``      Table 6         the performance benchmark's JSON
==============================  ==============  ===========================================

Every command takes ``--out DIR`` and writes ``<stem>.png`` and ``<stem>.pdf`` there.
"""
