mod api;
mod crash;
mod model;
