# seqserve serving image: onnxruntime + gRPC (the serving install, no training extra). Build: docker build -t seqserve .
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY training ./training
COPY export ./export
COPY proto ./proto
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim-bookworm
RUN useradd --create-home --uid 10001 seqserve
COPY --from=build /install /usr/local
COPY models /models
USER 10001
EXPOSE 50051 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import grpc,sys;from grpc_health.v1 import health_pb2 as h,health_pb2_grpc as g;c=grpc.insecure_channel('127.0.0.1:50051');sys.exit(0 if g.HealthStub(c).Check(h.HealthCheckRequest(),timeout=2).status==1 else 1)"]
ENTRYPOINT ["seqserve", "serve"]
CMD ["--model-repository", "/models", "--host", "0.0.0.0", "--grpc-port", "50051", "--metrics-port", "8000"]
