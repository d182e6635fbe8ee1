mod api;
mod crash;
mod ids;
mod in_flight;
mod model;
