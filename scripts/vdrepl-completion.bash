# bash completion for vdrepl. `make install` puts it where bash-completion
# finds it (PREFIX/share/bash-completion/completions/vdrepl); or source it
# from ~/.bashrc.
#
# vdrepl itself lists the candidates: urfave/cli answers a command line that
# ends in --generate-bash-completion with the subcommands, or with the flags
# when the word being completed starts with "-", and runs nothing. When it
# offers nothing (the value of --disk, --config, ...), bash completes file
# names.

_vdrepl() {
	local cur words cword
	if declare -F _get_comp_words_by_ref >/dev/null; then
		# bash-completion keeps --disk a=/x:1G one word (bash splits at = and :).
		_get_comp_words_by_ref -n =: cur words cword
	else
		cur=${COMP_WORDS[COMP_CWORD]} words=("${COMP_WORDS[@]}") cword=$COMP_CWORD
	fi
	local args=("${words[@]:0:cword}")
	if [[ $cur == -* ]]; then
		args+=("$cur")
	fi
	local IFS=$'\n'
	local opts
	opts=$("${args[@]}" --generate-bash-completion 2>/dev/null) || return 0
	COMPREPLY=($(compgen -W "$opts" -- "$cur"))
}

complete -o bashdefault -o default -F _vdrepl vdrepl
