"""What the image stages run, copied into them as this one folder (images/Dockerfile): the facts
table, refs and arches, fetching and patching a tree (source, overlay, fingerprint, safefs),
the Triton check and the flash-attn stub, and the command registry they register with.
Standard library only; nothing here imports the rest of ktlegacy. ``python -m ktlegacy.core``
runs their commands; ``python -m ktlegacy`` runs them and the host's commands."""
