# A small build graph for `nixspace demo` and the end-to-end tests: a chain
# (base -> left/right -> top) with a fan-out in the middle. It needs no
# nixpkgs: builders are /bin/sh and use shell built-ins only (Nix builders
# see PATH=/path-not-set). `nonce` makes every run's derivations fresh.
{ nonce ? "" }:
let
  step = name: deps: derivation {
    inherit name nonce deps;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" ''
      echo "building ${name}"
      for d in $deps; do
        while IFS= read -r line; do echo "$line"; done < "$d"
      done > "$out"
      echo "${name}" >> "$out"
    '' ];
  };
  base = step "demo-base" [ ];
  left = step "demo-left" [ base ];
  right = step "demo-right" [ base ];
  top = step "demo-top" [ left right ];
in
top
