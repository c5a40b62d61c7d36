# A wheelhouse directory as an image, for `invoke build --wheelhouse DIR` (BuildKit in Docker
# 20.10 has no --build-context): built with DIR as its context, then mounted read-only at
# /wheelhouse by the RUN steps of images/Dockerfile that install packages (WHEELHOUSE_IMAGE).
# It never becomes a layer of the ktlegacy image itself.
FROM scratch
COPY . /
