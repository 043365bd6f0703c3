# expo-serve on a CUDA machine. The install is the Makefile's `install-runtime`: the package and
# what it needs to serve, without the dev extras (pytest, playwright, lm-eval, …) that `make install`
# adds for the tests. .dockerignore keeps local virtualenvs, caches and git out of the context.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential make \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 expo
WORKDIR /opt/expo-serve
COPY --chown=expo:expo . .
USER expo
# On a GPU machine the Makefile lets pip choose a CUDA build of torch; in a build container
# without a driver we ask for it explicitly.
RUN make install-runtime VENV=/opt/expo-serve/.venv TORCH_SPEC="torch>=2.4"

ENV PATH=/opt/expo-serve/.venv/bin:$PATH EXPO_HOME=/home/expo/.cache/expo-serve
EXPOSE 8000
ENTRYPOINT ["expo-serve"]
CMD ["demo", "--host", "0.0.0.0", "--port", "8000"]
