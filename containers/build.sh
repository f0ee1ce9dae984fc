#!/usr/bin/env bash
# Build the teacher and trainer images with the versions in containers/versions.env.
#   containers/build.sh [teacher|trainer|all] [tag-prefix]
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:-all}"
prefix="${2:-vpmoe}"
args=()
while IFS='=' read -r key value; do
  [[ -z "$key" || "$key" == \#* ]] && continue
  args+=(--build-arg "$key=$value")
done < containers/versions.env
for image in teacher trainer; do
  if [[ "$which" == all || "$which" == "$image" ]]; then
    docker build -f "containers/$image.Dockerfile" "${args[@]}" -t "$prefix-$image:latest" .
  fi
done
