# The Touchstone application image: api, workers, migrations, flower.
#
# BASE_IMAGE is any Debian/Ubuntu image with python3 >= 3.11 and python3-venv. With a registry,
# `python:3.11-slim-bookworm` works. Without one, scripts/build-stack-images.sh builds
# `touchstone/stack-base:bookworm` offline with mmdebstrap and passes it here.
#
# Python dependencies come from a wheelhouse built on the host (build/wheelhouse), so the build
# itself needs no network: `pip install --no-index`.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 VIRTUAL_ENV=/opt/touchstone \
    PATH=/opt/touchstone/bin:$PATH TOUCHSTONE_DATA_DIR=/var/lib/touchstone
COPY build/wheelhouse /tmp/wheelhouse
RUN python3 -m venv /opt/touchstone \
 && /opt/touchstone/bin/pip install --no-index --find-links /tmp/wheelhouse 'touchstone[prod]' \
 && rm -rf /tmp/wheelhouse
WORKDIR /var/lib/touchstone
ENTRYPOINT ["touchstone"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
