mod basics;
mod disk_full;
mod recovery;
