#!/bin/bash
# Give a DKMS source tree exactly a set of source patches, with DKMS's own PATCH[] / PATCH_MATCH[] (dkms(8)):
#
#   dkms-patches.sh SRC_DIR [PATCH_FILE MATCH]...
#
# SRC_DIR is the module's /usr/src/<module>-<version> (the directory of its dkms.conf). Each PATCH_FILE is copied
# to SRC_DIR/patches/<its file name> (unless it is that file already) and named in a block of dkms.conf that this
# script owns: PATCH+=("<name>"), and PATCH_MATCH[<its index>]="<MATCH>" when MATCH is not empty. DKMS copies
# SRC_DIR to its build directory and runs `patch -p1 < ./patches/<name>` there before every build, for each
# kernel release that the bash regular expression MATCH matches (unanchored, `[[ $kernelver =~ $MATCH ]]`; empty:
# every kernel), so a kernel update on the node is built with the same patches. SRC_DIR itself stays unpatched.
#
# Idempotent: the block is rewritten only when it changes, patch files are copied only when they differ, and
# patch files that an earlier set named and this one does not are removed; no pairs removes the block. Prints
# "changed" or "unchanged" (last line). A bad argument or a failure is one line on stderr, exit status 1.
#
# Used by the role nvidia-gpu-drivers on the target and by builder's host-side module build (builder.hostmodule),
# so that both give DKMS the same patches.
set -euo pipefail

BEGIN='# BEGIN nvidia-gpu-drivers DKMS patches (dkms-patches.sh rewrites this block; edits here are lost)'
END='# END nvidia-gpu-drivers DKMS patches'

die() { printf 'dkms-patches: %s\n' "$*" >&2; exit 1; }

[ $# -ge 1 ] || die "usage: dkms-patches.sh SRC_DIR [PATCH_FILE MATCH]..."
src=$1; shift
[ $(($# % 2)) -eq 0 ] || die "each patch needs a MATCH (give '' for every kernel)"
conf=$src/dkms.conf
[ -f "$conf" ] || die "$conf does not exist: $src is not a DKMS source tree"

names=() matches=() files=()
while [ $# -gt 0 ]; do
    file=$1 match=$2; shift 2
    name=${file##*/}
    [ -f "$file" ] || die "$file is not a file"
    [[ $name =~ ^[A-Za-z0-9][A-Za-z0-9._+-]*$ ]] || die "patch file name '$name': letters, digits and . _ + - only"
    for n in "${names[@]}"; do [ "$n" != "$name" ] || die "two patches are named $name"; done
    # dkms.conf is sourced twice (dkms re-sources what it read): no character that double quotes would change
    case $match in
        *'"'* | *'`'* | *'\\'* | *"'"* | *[[:space:]]*)
            die "match '$match' of $name: no quotes, backquotes, doubled backslashes or spaces" ;;
    esac
    [[ ${match%\$} != *'$'* ]] || die "match '$match' of $name: \$ only as the last character (end of the release)"
    rc=0; [[ "" =~ $match ]] || rc=$?
    [ "$rc" -ne 2 ] || die "match '$match' of $name is not a valid bash (POSIX extended) regular expression"
    names+=("$name") matches+=("$match") files+=("$file")
done

block=""
if [ ${#names[@]} -gt 0 ]; then
    block="$BEGIN"$'\n'
    for i in "${!names[@]}"; do
        # appended after the package's own PATCH[] entries, whatever their number (and also under set -u)
        line="PATCH+=(\"${names[$i]}\")"
        [ -z "${matches[$i]}" ] || line+="; PATCH_MATCH[\${#PATCH[@]}-1]=\"${matches[$i]}\""
        block+="$line"$'\n'
    done
    block+="$END"$'\n'
fi

# dkms.conf as the block (old_block) and everything else (rest); plain bash: a build root may have no awk
old_block="" rest="" inside=no
while IFS= read -r line || [ -n "$line" ]; do
    [ "$line" != "$BEGIN" ] || inside=yes
    if [ $inside = yes ]; then old_block+="$line"$'\n'; else rest+="$line"$'\n'; fi
    [ "$line" != "$END" ] || inside=no
done < "$conf"
old_block=${old_block%$'\n'} rest=${rest%$'\n'}
old_names=$(printf '%s\n' "$old_block" | sed -n 's/^PATCH+=("\([^"]*\)").*/\1/p')
# the package's own patches (dkms.conf without this block) are not this script's to replace
own=$(kernelver=0 arch=x86_64 bash -c '. /dev/stdin >/dev/null 2>&1; printf "%s\n" "${PATCH[@]}"' <<< "$rest")
for i in "${!names[@]}"; do
    ! grep -qxF -- "${names[$i]}" <<< "$own" || die "$conf names ${names[$i]} itself: give the patch another name"
    if [ -e "$src/patches/${names[$i]}" ] && ! grep -qxF -- "${names[$i]}" <<< "$old_names" \
        && ! cmp -s "${files[$i]}" "$src/patches/${names[$i]}"; then
        die "$src/patches/${names[$i]} exists and is not one of these patches: give the patch another name"
    fi
done

changed=no
[ ${#names[@]} -eq 0 ] || mkdir -p "$src/patches"
for i in "${!names[@]}"; do
    dest=$src/patches/${names[$i]}
    if ! cmp -s "${files[$i]}" "$dest"; then
        { cp -f "${files[$i]}" "$dest.tmp" && chmod 0644 "$dest.tmp" && mv -f "$dest.tmp" "$dest"; } \
            || die "cannot write $dest"
        changed=yes
    fi
done
for old in $old_names; do
    keep=no
    for n in "${names[@]}"; do [ "$n" != "$old" ] || keep=yes; done
    if [ $keep = no ] && [ -e "$src/patches/$old" ]; then rm -f "$src/patches/$old"; changed=yes; fi
done
# the directory this script made for patches it no longer has, when nothing else is in it
[ ${#names[@]} -gt 0 ] || [ -z "$old_names" ] || rmdir "$src/patches" 2>/dev/null || true

if [ "$old_block"$'\n' != "$block" ] && { [ -n "$old_block" ] || [ -n "$block" ]; }; then
    {
        printf '%s\n' "$rest"
        [ -z "$block" ] || printf '%s' "$block"
    } > "$conf.tmp" || die "cannot write $conf.tmp"
    chmod --reference="$conf" "$conf.tmp" 2>/dev/null || chmod 0644 "$conf.tmp"
    mv -f "$conf.tmp" "$conf" || die "cannot replace $conf"
    changed=yes
fi

# what DKMS will read: the names and matches as dkms.conf now sets them, after the package's own
got=$(kernelver=0 arch=x86_64 bash -c '. "$1" >/dev/null 2>&1
    for i in "${!PATCH[@]}"; do printf "%s|%s\n" "${PATCH[$i]}" "${PATCH_MATCH[$i]:-}"; done' _ "$conf")
for i in "${!names[@]}"; do
    grep -qxF -- "${names[$i]}|${matches[$i]}" <<< "$got" \
        || die "$conf does not name ${names[$i]} after the edit (it names: ${got//$'\n'/, })"
done
echo "$([ $changed = yes ] && echo changed || echo unchanged)"
