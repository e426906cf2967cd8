"""The qemu-img compatible command line: argv parsing, output rendering, exit statuses."""
