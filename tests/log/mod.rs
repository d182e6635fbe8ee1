mod basics;
mod disk_full;
mod outcomes;
mod recovery;
