mod api;
mod crash;
mod ids;
mod model;
