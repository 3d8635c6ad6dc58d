echo "test.sh read: $(cat "$1")"
