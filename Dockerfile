# radlens agent image. Build: docker build -t radlens .
# Run:  docker run -d --name radlens -p 11112:11112 \
#         -v radlens-data:/data -v "$PWD/radlens.yaml:/config/radlens.yaml:ro" \
#         -e RADLENS_CONFIG=/config/radlens.yaml radlens
# With a GPU (NVIDIA Container Toolkit): add --gpus all (used once models land, device: auto).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    RADLENS_STORAGE__DATA_DIR=/data

RUN useradd --system --create-home --uid 10001 radlens \
    && mkdir -p /data /config && chown radlens /data

WORKDIR /opt/radlens
COPY pyproject.toml README.md ./
COPY radlens ./radlens
RUN pip install --no-compile '.[cluster,ray]'

USER radlens
VOLUME ["/data"]
EXPOSE 11112 9112
# A C-ECHO to ourselves. With dicom.allowed_calling_aets set, list our own AE title there too.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s \
    CMD radlens echo 127.0.0.1 "${RADLENS_DICOM__PORT:-11112}" "${RADLENS_DICOM__AE_TITLE:-RADLENS}" || exit 1
ENTRYPOINT ["radlens"]
CMD ["serve"]
