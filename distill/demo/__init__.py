"""Demo fixtures, apart from the library: the shapes data and judge behind the bundled text teacher, its
teacher/student comparison, and the toy metrics. Configuration, training and export never import this package."""
